"""The cached runner == the cache-free reference through narrowed forwards, kept commits, settles and resets."""

from __future__ import annotations

import copy

import pytest
import torch

from flare.engine.runner import CachedRunner, ReferenceRunner
import flare.ops.gated_delta.pending as pending


@pytest.mark.parametrize("kept", [True, False])
def test_kept_commits_through_narrowed_rounds_resets_and_causal_steps(flare_models, kept, monkeypatch):
    """Rounds of rows over the first n of 3 slots, each committing a random prefix of 4 clean rows: the kept
    commits outgrow their room (a settle before narrowing), narrowed rounds alone fill it again before a causal
    step on fewer slots writes them, a slot is handed to a new prompt; every forward's rows equal the
    reference's (float64: to round-off). Also with every commit written at once (states below
    ``KEEP_MIN_STATE_BYTES``, as the tiny model's are unless the bound is lowered)."""
    monkeypatch.setattr(pending, "KEEP_MIN_STATE_BYTES", 0 if kept else 1 << 62)
    model = copy.deepcopy(flare_models["qwen3_5"]).to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    cached, ref = CachedRunner(model, 3, 16), ReferenceRunner(model, 3)

    def both(call, *args, only=slice(None), **kwargs):
        a, b = getattr(cached, call)(*args, **kwargs), getattr(ref, call)(*args, **kwargs)
        if a is not None:
            torch.testing.assert_close(a[only], b[only], rtol=1e-9, atol=1e-9)

    both("prefill", [torch.randint(0, 90, (n,), generator=gen).tolist() for n in (5, 9, 3)])
    settled = []
    for r, n in enumerate([3, 2, 3, 1, 2, 2, 1, 2, 3, 3, 2, 3]):
        if r == 10:  # slot 2 starts a new sequence
            both("reset", [2])
            both("prefill", [[], [], torch.randint(0, 90, (4,), generator=gen).tolist()], only=2)
        if r in (7, 9):  # a causal step on the first two slots (the kept commits are written first)
            both("append", torch.randint(0, 90, (2, 1), generator=gen))
        tokens = torch.cat([torch.randint(0, 90, (n, 4), generator=gen), torch.full((n, 2), 95)], 1)
        clean, noisy = torch.full((n,), 4), torch.full((n,), 2)
        both("rows", tokens, clean, noisy, record=True, clean_rows=4)
        settled.append((cached.cache.pending_room() < 4, n))
        both("commit_recorded", torch.randint(1, 5, (n,), generator=gen))
        torch.testing.assert_close(cached.lengths(), ref.lengths())
    # The room ran out (a settle of all slots before a narrowed commit) at least once; or there is none.
    assert any(full and n < 3 for full, n in settled) if kept else cached.cache.pending_room() == 0
