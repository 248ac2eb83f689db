"""Rows as a tree (AR-Trust drafting from every acceptance point): each MASK group seeded after clean prefix
k equals the ordinary rows forward [clean x k ; MASK group], hence the training noisy block at that boundary
(tests/model/test_two_stream.py ties that one to training); clean rows stay causal; nothing is written."""

from __future__ import annotations

import copy

import pytest
import torch

from flare.model.context import Rows

MASK = 95


@pytest.fixture(scope="module")
def models64(tiny_models):
    return {fam: copy.deepcopy(m).double() for fam, (m, _) in tiny_models.items()}


def _seeds(B: int, N: int, M: int, prefixes: list[int], pad: int = 0) -> torch.Tensor:
    return torch.tensor([[0] * N + [p for p in prefixes for _ in range(M)] + [0] * pad] * B)


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next", "llama"])
@pytest.mark.parametrize("N", [2, 4])
def test_every_group_equals_the_rows_forward_of_its_own_prefix(models64, family, N):
    model, M, B = models64[family], N - 1, 2
    g = torch.Generator().manual_seed(N)
    prefix = torch.randint(0, 90, (B, 9), generator=g)
    clean = torch.randint(0, 90, (B, N), generator=g)
    prefixes = list(range(1, N + 1))  # a group after pending, d_1 .. d_k for every k
    rows = torch.cat([clean, torch.full((B, N * M), MASK)], 1)
    with torch.no_grad():
        cache = model.new_cache(B)
        model.hidden_states(prefix, cache=cache)
        before = cache.clone()
        out = model.hidden_states(rows, cache=cache, layout=Rows(N, N * M, seeds=_seeds(B, N, M, prefixes)))
        assert torch.equal(cache.lengths, before.lengths)
        for a, b in zip(cache.layers, before.layers):
            if not hasattr(a, "k"):
                assert torch.equal(a.conv, b.conv) and torch.equal(a.ssm, b.ssm)
        causal = model.hidden_states(clean, cache=before.clone())
        assert (out[:, :N] - causal).abs().max() <= 1e-10
        for j, k in enumerate(prefixes):
            alone = model.hidden_states(torch.cat([clean[:, :k], torch.full((B, M), MASK)], 1),
                                        cache=before.clone(), layout=Rows(k))
            got = out[:, N + j * M: N + (j + 1) * M]
            assert (got - alone[:, k:]).abs().max() <= 1e-10, (family, k)


def test_groups_per_sequence_padding_and_a_changed_draft(models64):
    """Sequences with different clean counts and group seeds in one forward, with padding rows; changing draft
    d_k changes only the groups seeded after it (a positive and a negative control)."""
    model, M = models64["qwen3_5"], 2
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 90, (2, 6), generator=g)
    clean = torch.randint(0, 90, (2, 3), generator=g)
    rows = torch.cat([clean, torch.full((2, 3 * M + 1), MASK)], 1)
    rows[1, 1:] = MASK  # sequence 1: one clean row, then its group
    seeds = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 3, 3, 0], [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]])
    layout = Rows(torch.tensor([3, 1]), torch.tensor([3 * M, M]), seeds=seeds)
    with torch.no_grad():
        cache = model.new_cache(2)
        model.hidden_states(prefix, cache=cache)
        out = model.hidden_states(rows, cache=cache.clone(), layout=layout)
        alone = model.new_cache(1)
        model.hidden_states(prefix[1:], cache=alone)
        one = model.hidden_states(torch.cat([clean[1:, :1], torch.full((1, M), MASK)], 1), cache=alone,
                                  layout=Rows(1))
        assert (out[1, 1:1 + M] - one[0, 1:]).abs().max() <= 1e-10
        changed = rows.clone()
        changed[0, 2] = (changed[0, 2] + 1) % 90  # d_2: seen by the group after prefix 3 only
        out2 = model.hidden_states(changed, cache=cache.clone(), layout=layout)
        assert (out2[0, 3:3 + 2 * M] - out[0, 3:3 + 2 * M]).abs().max() <= 1e-12
        assert (out2[0, 3 + 2 * M:3 + 3 * M] - out[0, 3 + 2 * M:3 + 3 * M]).abs().max() > 1e-6



def test_a_reused_tree_and_the_equal_lengths_mask_give_the_same_rows(models64):
    """A tree built once and passed with the layout (what the runner does for a recurring layout), and the
    mask widened from the rows' own block when every length is equal, change nothing: against the same forward
    building its tree, over a cache whose lengths differ (generic mask) and one whose lengths are equal."""
    from flare.model.row_tree import RowTree

    model, N = models64["qwen3_5"], 3
    M = N - 1
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 90, (2, N), generator=g)
    rows = torch.cat([clean, torch.full((2, N * M), MASK)], 1)
    seeds = _seeds(2, N, M, list(range(1, N + 1)))
    for lengths in ([7, 7], [7, 4]):
        prefix = torch.randint(0, 90, (2, 7), generator=g)
        with torch.no_grad():
            cache = model.new_cache(2)
            valid = None if lengths[0] == lengths[1] else torch.arange(7) < torch.tensor(lengths)[:, None]
            model.hidden_states(prefix, cache=cache, valid=valid)
            assert cache.bound_exact == (lengths[0] == lengths[1])
            fresh = model.hidden_states(rows, cache=cache.clone(), layout=Rows(N, N * M, seeds=seeds))
            tree = RowTree.build(torch.full((2,), N), torch.full((2,), N * M), seeds)
            for _ in range(2):
                reused = model.hidden_states(rows, cache=cache.clone(), layout=Rows(N, N * M, seeds, tree=tree))
                assert torch.equal(reused, fresh)


def test_the_equal_lengths_mask_is_the_rule(models64):
    from flare import masks
    from flare.model.row_tree import RowTree

    seeds = _seeds(3, 4, 3, [1, 2, 3, 4], pad=2)
    tree = RowTree.build(torch.tensor([4, 4, 1]), torch.tensor([12, 12, 3]), seeds)
    T = seeds.shape[1]
    for L in (0, 5):
        rule = masks.inference_tree(torch.full((3,), L), tree.sees(), tree.real)
        assert torch.equal(masks.after_committed(tree.own_mask(), L), masks.materialize(rule, 3, T, L + T, "cpu"))


def test_the_context_makes_the_conv_windows_before_the_layers_run(models64):
    """A compiled forward must find the tree's conv windows made (made inside it, the memo changes under the
    graph's guards and the next call recompiles): the context builds them."""
    model, N, B = models64["qwen3_5"], 3, 2
    M = N - 1
    rows = torch.cat([torch.randint(0, 90, (B, N)), torch.full((B, N * M), MASK)], 1)
    with torch.no_grad():
        cache = model.new_cache(B)
        model.hidden_states(torch.randint(0, 90, (B, 5)), cache=cache)
        ctx = model.context(rows, cache=cache, layout=Rows(N, N * M, seeds=_seeds(B, N, M, list(range(1, N + 1)))))
    assert ("windows", model.config.linear_conv_kernel_dim) in ctx.tree._memo


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
@pytest.mark.parametrize("N", [2, 4])
def test_the_branch_row_is_causal_and_its_group_is_the_rows_forward_after_it(models64, family, N):
    """redraft=tree (``flare.decoding.groups``): the branch row after ``pending`` is the causal row of
    [pending, second]; its group equals the rows forward [pending, second ; MASK group] (the training noisy block
    seeded there); the clean chain and the groups after its prefixes stay as without the branch."""
    from flare.decoding.groups import Groups

    model, M, B = models64[family], N - 1, 2
    g = torch.Generator().manual_seed(N + 7)
    prefix = torch.randint(0, 90, (B, 9), generator=g)
    clean = torch.randint(0, 90, (B, N), generator=g)
    second = torch.randint(0, 90, (B,), generator=g)
    tree, plain = (Groups(N, MASK, B, torch.device("cpu"), branch) for branch in (True, False))
    with torch.no_grad():
        cache = model.new_cache(B)
        model.hidden_states(prefix, cache=cache)
        rows = tree.tokens(clean[:, 0], clean[:, 1:], second)
        out = model.hidden_states(rows, cache=cache.clone(), layout=Rows(N, tree.rows - N, seeds=tree.seeds))
        base = model.hidden_states(plain.tokens(clean[:, 0], clean[:, 1:], second), cache=cache.clone(),
                                   layout=Rows(N, plain.rows - N, seeds=plain.seeds))
        assert (out[:, :N] - base[:, :N]).abs().max() <= 1e-10
        assert (out[:, tree.lead:] - base[:, plain.lead:]).abs().max() <= 1e-10
        path = torch.stack([clean[:, 0], second], 1)
        causal = model.hidden_states(path, cache=cache.clone())
        assert (out[:, N] - causal[:, 1]).abs().max() <= 1e-10
        alone = model.hidden_states(torch.cat([path, torch.full((B, M), MASK)], 1), cache=cache.clone(),
                                    layout=Rows(2))
        assert (out[:, N + 1:N + 1 + M] - alone[:, 2:]).abs().max() <= 1e-10
        assert torch.equal(tree.kept(torch.tensor([0, 1]), torch.tensor([True, False]))[:, 0],
                           torch.tensor([N + 1, tree.lead + M]))
