"""A two-stream forward over the kept noisy blocks only (``flare.model.noisy_blocks``) equals the full layout on
every row it keeps, and the FLARE loss and its gradients do not change when idle blocks are dropped."""

from __future__ import annotations

import copy

import pytest
import torch

from flare.data import PackedBatch
from flare.model.noisy_blocks import NoisyBlocks
from flare.objective import FlareObjective, ObjectiveConfig, sample_views
from flare.testing.checkpoints import FAMILIES

MASK = 95


@pytest.fixture(scope="module")
def models64(tiny_models):
    return {fam: copy.deepcopy(m).double() for fam, (m, _) in tiny_models.items()}


def test_active_keeps_blocks_with_a_masked_row_in_view_then_block_order():
    masked = torch.zeros(3, 2, 12, dtype=torch.bool)
    masked[0, 1, 2] = masked[0, 0, 10] = masked[0, 0, 11] = True  # view 1 block 0, view 0 block 3
    masked[1, 0, 4] = masked[1, 0, 5] = masked[1, 1, 9] = masked[1, 0, 0] = True
    kept = NoisyBlocks.active(masked, 3)  # row 2: nothing masked, all padding
    assert kept.view.tolist() == [[0, 1, 0], [0, 0, 1], [0, 0, 0]]
    assert kept.block.tolist() == [[3, 0, -1], [0, 1, 3], [-1, -1, -1]]
    assert kept.rows == 9
    assert kept.row_pos[0].tolist() == [9, 10, 11, 0, 1, 2, 0, 0, 0]
    assert kept.row_view[0].tolist() == [0, 0, 0, 1, 1, 1, -1, -1, -1]
    assert kept.full_index(2, 12)[0].tolist() == [9, 10, 11, 12, 13, 14, 24, 24, 24]
    x = torch.arange(3 * 2 * 12).view(3, 2, 12)
    assert kept.select(x)[1].tolist() == [24, 25, 26, 27, 28, 29, 45, 46, 47]
    assert NoisyBlocks.active(torch.zeros(1, 1, 6, dtype=torch.bool), 3).block.tolist() == [[-1]]


def _docs(lengths: list[int], total: int) -> torch.Tensor:
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return torch.cat([ids, torch.full((total - len(ids),), len(lengths))])


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_rows_equal_the_full_layout(models64, family):
    model, bs, L, V = models64[family], 3, 24, 2
    g = torch.Generator().manual_seed(7)
    x0 = torch.randint(0, 90, (2, L), generator=g)
    doc_ids = torch.stack([_docs([9, 12], L), _docs([15], L)])
    masked = torch.rand(2, V, L, generator=g) < 0.15
    masked[1] = False
    masked[1, 1, 13] = True  # the second row keeps one block: the rest of its noisy stream is padding
    xt = torch.where(masked, torch.full_like(x0[:, None].expand(2, V, L), MASK), x0[:, None])
    kept = NoisyBlocks.active(masked, bs)
    with torch.no_grad():
        ids, layout = model.two_stream_input(x0, xt, doc_ids, bs)
        full = model.hidden_states(ids, layout=layout)
        ids, layout = model.two_stream_input(x0, xt, doc_ids, bs, "token", kept)
        assert ids.shape[1] == L + kept.rows < (1 + V) * L
        part = model.hidden_states(ids, layout=layout)
    assert (part[:, :L] - full[:, :L]).abs().max() <= 1e-12
    want = kept.select(full[:, L:].reshape(2, V, L, -1))
    assert ((part[:, L:] - want).abs().amax(-1) * kept.real).max() <= 1e-12


def _batch(seed: int) -> PackedBatch:
    """Rows of prompt-heavy documents (long prompt, short response), as supervised transfer data is."""
    g = torch.Generator().manual_seed(seed)
    rows, lm, docs = [], [], []
    for _ in range(3):
        ids, mask, dd = [], [], []
        for d, (prompt, response) in enumerate([(14, 4), (10, 5)]):
            n = prompt + response
            pad = -n % 3
            ids += torch.randint(0, 90, (n + pad,), generator=g).tolist()
            mask += [False] * prompt + [True] * response + [False] * pad
            dd += [d] * (n + pad)
        rows.append(ids + [0] * (42 - len(ids))), lm.append(mask + [False] * (42 - len(mask)))
        docs.append(dd + [2] * (42 - len(dd)))
    return PackedBatch(torch.tensor(rows), torch.tensor(lm), torch.tensor(docs))


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients_do_not_change_when_idle_blocks_are_dropped(models64, family):
    model = models64[family]
    batch = _batch(3)
    views = sample_views(batch, 3, MASK, generator=torch.Generator().manual_seed(4))
    out = []
    for drop in (True, False):
        objective = FlareObjective(ObjectiveConfig(block_size=3), MASK)
        objective.drop_idle_blocks = drop
        rows = objective.prepare(model, batch, views).input_ids.shape[1]
        model.zero_grad()
        loss, metrics = objective.loss_from_views(model, batch, views)
        loss.backward()
        out.append((rows, loss.item(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (rows_kept, l1, m1, g1), (rows_all, l2, m2, g2) = out
    assert rows_all == 3 * 42 and rows_kept <= 42 + 2 * 4 * 3  # the responses span 4 of the 14 blocks per view
    assert abs(l1 - l2) <= 1e-12 and m1 == pytest.approx(m2, abs=1e-12)
    for name in g1:
        assert (g1[name] - g2[name]).abs().max() <= 1e-10 * max(1.0, g1[name].abs().max().item()), name
