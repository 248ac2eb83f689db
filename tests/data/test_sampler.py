"""Sampler: resumed == uninterrupted, ranks disjoint and covering, seeded, mixture-weighted."""

from __future__ import annotations

import io
import math
from collections import Counter

import pytest
import torch

from flare.data import PackedBatch, PackedDataset, Sampler


def numbered(name: str, n: int, offset: int = 0, seq_len: int = 6) -> PackedDataset:
    """Row i holds the token offset + i everywhere, so a batch tells which rows it took."""
    ids = (torch.arange(n)[:, None] + offset).expand(n, seq_len).contiguous()
    return PackedDataset(PackedBatch(ids, torch.ones(n, seq_len, dtype=torch.bool),
                                     torch.zeros(n, seq_len, dtype=torch.long)), name)


def row_ids(batch: PackedBatch) -> list[int]:
    return batch.input_ids[:, 0].tolist()


def sources():
    # Small, unequal sizes so that the run crosses several epochs of each source.
    return {"math": numbered("math", 7), "chat": numbered("chat", 11, offset=100)}


def test_resumed_iteration_equals_uninterrupted():
    full = Sampler(sources(), 3, weights={"math": 0.4, "chat": 0.6}, seed=5)
    batches = [row_ids(next(full)) for _ in range(12)]

    first = Sampler(sources(), 3, weights={"math": 0.4, "chat": 0.6}, seed=5)
    for _ in range(5):
        next(first)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # the state survives a checkpoint file
    buf.seek(0)
    resumed = Sampler(sources(), 3, weights={"math": 0.4, "chat": 0.6}, seed=5)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.steps == 5
    assert [row_ids(next(resumed)) for _ in range(7)] == batches[5:]
    # Without the state, a fresh sampler replays from the start: the state really carried the position.
    fresh = Sampler(sources(), 3, weights={"math": 0.4, "chat": 0.6}, seed=5)
    assert row_ids(next(fresh)) == batches[0] != batches[5]


def test_ranks_disjoint_and_covering_each_epoch():
    n, batch, world = 24, 2, 3
    per_epoch = n // (batch * world)
    ranks = [Sampler(numbered("d", n), batch, seed=1, rank=r, world_size=world) for r in range(world)]
    epochs = []
    for _ in range(2):
        seen = [row for _ in range(per_epoch) for s in ranks for row in row_ids(next(s))]
        assert sorted(seen) == list(range(n))  # disjoint (no repeats) and covering
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    assert all(s.state_dict()["cursors"] == ranks[0].state_dict()["cursors"] for s in ranks)


def test_global_stream_independent_of_world_size():
    """Rank slices of a 3-rank run concatenate to the 1-rank stream: resuming with another world size works."""
    single = Sampler(sources(), 6, seed=2)
    ranks = [Sampler(sources(), 2, seed=2, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        assert row_ids(next(single)) == [i for s in ranks for i in row_ids(next(s))]


def test_seed_shuffle_and_weights():
    a = [row_ids(next(Sampler(numbered("d", 50), 10, seed=0)))]
    assert a == [row_ids(next(Sampler(numbered("d", 50), 10, seed=0)))]
    assert a != [row_ids(next(Sampler(numbered("d", 50), 10, seed=1)))]
    assert row_ids(next(Sampler(numbered("d", 50), 10, shuffle=False))) == list(range(10))

    sampler = Sampler(sources(), 50, weights={"math": 0.25, "chat": 0.75}, seed=3)
    counts = Counter()
    for _ in range(40):
        next(sampler)
        counts.update(sampler.last_sources)
    assert abs(counts["math"] / 2000 - 0.25) < 4.5 * math.sqrt(0.25 * 0.75 / 2000)
    assert sampler.epochs["math"] == pytest.approx(counts["math"] / 7)


def test_batches_are_packed_batches_of_the_right_shape():
    batch = next(Sampler(sources(), 4, seed=0))
    assert isinstance(batch, PackedBatch) and batch.input_ids.shape == (4, 6)
    assert batch.input_ids.dtype == torch.long and batch.doc_ids.dtype == torch.long


def test_bad_configuration_and_mismatched_state():
    with pytest.raises(ValueError, match="rank"):
        Sampler(sources(), 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="mixture sources"):
        Sampler(sources(), 2, weights={"math": 1.0})
    with pytest.raises(ValueError, match="row length"):
        Sampler({"a": numbered("a", 3), "b": numbered("b", 3, seq_len=9)}, 2)
    state = Sampler(sources(), 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        Sampler(sources(), 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="sources"):
        Sampler({"math": numbered("math", 8), "chat": numbered("chat", 11)}, 2).load_state_dict(state)
