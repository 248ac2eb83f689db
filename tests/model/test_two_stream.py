"""The two-stream forward through the whole model (attention and GDN layers), and its inference counterpart.

Invariance tests run in float64, where "unchanged" means equal to round-off, so that a leak of any size shows.
"""

from __future__ import annotations

import copy

import pytest
import torch

from flare.model.context import Packed, Rows
from flare.model.noisy_blocks import NoisyBlocks
from flare.testing.checkpoints import FAMILIES

MASK = 95  # any id works as [MASK] for these invariants (the tiny vocabulary has 96 rows)


@pytest.fixture(scope="module")
def models64(tiny_models):
    return {fam: copy.deepcopy(m).double() for fam, (m, _) in tiny_models.items()}


def _docs(lengths: list[int], total: int) -> torch.Tensor:
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return torch.cat([ids, torch.full((total - len(ids),), len(lengths))])[None]


def _noisy(x0: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(x0.shape, generator=g) < p, torch.full_like(x0, MASK), x0)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_equal_documents_alone(models64, family):
    model = models64[family]
    lengths, L = [9, 20, 3], 37
    x = torch.randint(0, 90, (1, L))
    doc_ids = _docs(lengths, L)
    with torch.no_grad():
        packed = model(x, layout=Packed(doc_ids))
        start = 0
        for n in lengths + [L - sum(lengths)]:
            alone = model(x[:, start : start + n])
            assert (packed[:, start : start + n] - alone).abs().max() <= 1e-10
            start += n


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next", "llama"])
@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nothing_masked_clean_half_equals_plain_forward(tiny_models, models64, family, block_size, dtype):
    model = tiny_models[family][0] if dtype == torch.float32 else models64[family]
    L = 8 * block_size + 1
    x0 = torch.randint(0, 90, (2, L))
    doc_ids = _docs([2 * block_size, 5 * block_size], L).expand(2, L)
    with torch.no_grad():
        clean, noisy = model.two_stream_hidden(x0, x0[:, None], doc_ids, block_size)
        plain = model.hidden_states(x0, layout=Packed(doc_ids))
        diff = (model.logits(clean) - model.logits(plain)).abs().max()
    assert diff <= (1e-5 if dtype == torch.float32 else 1e-10)
    assert noisy.shape == (2, 1, L, model.config.hidden_size)


def _noisy_block_logits(model, x0, xt, doc_ids, bs, b):
    clean, noisy = model.two_stream_hidden(x0, xt, doc_ids, bs)
    return clean, noisy[:, :, b * bs : (b + 1) * bs]


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
@pytest.mark.parametrize("block_size", [3, 4])
def test_leakage_by_perturbation(models64, family, block_size):
    model, bs = models64[family], block_size
    L = 9 * bs
    doc_ids = _docs([3 * bs, 6 * bs], L)  # doc 0: blocks 0-2, doc 1: blocks 3-8
    x0 = torch.randint(0, 90, (1, L))
    xt = torch.stack([_noisy(x0, 0.5, 1), _noisy(x0, 0.5, 2)], dim=1)  # two views
    b = 5  # a block in the middle of doc 1
    with torch.no_grad():
        clean, ref = _noisy_block_logits(model, x0, xt, doc_ids, bs, b)

        def changed(x0_new=None, xt_new=None):
            c, n = _noisy_block_logits(model, x0 if x0_new is None else x0_new,
                                       xt if xt_new is None else xt_new, doc_ids, bs, b)
            return (n - ref).abs().max().item(), c

        def flip(t, idx):
            t = t.clone()
            t[idx] = (t[idx] + 7) % 90
            return t

        # A clean token of block b itself, and one of a later block: invisible to noisy block b.
        assert changed(x0_new=flip(x0, (0, b * bs + 1)))[0] <= 1e-12
        assert changed(x0_new=flip(x0, (0, (b + 2) * bs)))[0] <= 1e-12
        # A token of the other document, clean or noisy.
        assert changed(x0_new=flip(x0, (0, 2)))[0] <= 1e-12
        assert changed(xt_new=flip(xt, (0, 0, 2)))[0] <= 1e-12
        # A noisy token of another block, before or after.
        assert changed(xt_new=flip(xt, (0, 0, (b - 1) * bs)))[0] <= 1e-12
        assert changed(xt_new=flip(xt, (0, 0, (b + 1) * bs)))[0] <= 1e-12
        # The other view's copy of this block: view 0 is unchanged while view 1 itself changes.
        _, n_new = _noisy_block_logits(model, x0, flip(xt, (0, 1, b * bs)), doc_ids, bs, b)
        assert (n_new[:, 0] - ref[:, 0]).abs().max() <= 1e-12
        assert (n_new[:, 1] - ref[:, 1]).abs().max() > 1e-6
        # Positive controls: the clean block before b, and b's own noisy tokens, are seen.
        assert changed(x0_new=flip(x0, (0, b * bs - 1)))[0] > 1e-6
        assert changed(xt_new=flip(xt, (0, 0, b * bs)))[0] > 1e-6
        # Clean rows: a later clean token never changes an earlier clean row.
        _, c_new = changed(x0_new=flip(x0, (0, 7 * bs)))
        assert (c_new[:, : 7 * bs] - clean[:, : 7 * bs]).abs().max() <= 1e-12


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next", "llama"])
@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_training_noisy_block_equals_inference_rows(models64, family, block_size):
    """A training noisy block == an inference forward over (clean prefix from the cache) + (the block's rows)."""
    model, bs = models64[family], block_size
    L = 7 * bs
    doc_ids = _docs([2 * bs, 5 * bs], L)
    x0 = torch.randint(0, 90, (1, L))
    xt = _noisy(x0, 0.6, 3)[:, None]
    with torch.no_grad():
        _, noisy = model.two_stream_hidden(x0, xt, doc_ids, bs)
        for b in [2, 4, 6]:  # doc 1 starts at block 2 (its first block: an empty clean prefix)
            start = 2 * bs
            cache = model.new_cache(1)
            if b * bs > start:
                model.hidden_states(x0[:, start : b * bs], cache=cache)
            rows = model.hidden_states(xt[:, 0, b * bs : (b + 1) * bs], cache=cache, layout=Rows(0)) \
                if b * bs > start else _rows_without_prefix(model, xt[:, 0, b * bs : (b + 1) * bs])
            assert (rows - noisy[:, 0, b * bs : (b + 1) * bs]).abs().max() <= 1e-10


def _rows_without_prefix(model, block):
    return model.hidden_states(block, cache=model.new_cache(1), layout=Rows(0))


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_inference_rows_read_but_never_write(models64, family):
    model = models64[family]
    prefix, clean, noisy = torch.randint(0, 90, (2, 11)), torch.randint(0, 90, (2, 3)), torch.full((2, 3), MASK)
    with torch.no_grad():
        cache = model.new_cache(2)
        model.hidden_states(prefix, cache=cache)
        before = cache.clone()
        out = model.hidden_states(torch.cat([clean, noisy], 1), cache=cache, layout=Rows(3))
        assert torch.equal(cache.lengths, before.lengths)
        for a, b in zip(cache.layers, before.layers):
            if hasattr(a, "k"):  # committed slots only: the ones past the length are scratch
                assert torch.equal(a.k[:, :, :11], b.k[:, :, :11]) and torch.equal(a.v[:, :, :11], b.v[:, :, :11])
            else:
                assert torch.equal(a.conv, b.conv) and torch.equal(a.ssm, b.ssm)
        # Clean rows are ordinary causal rows; the noisy block then sees them as committed context.
        causal = model.hidden_states(clean, cache=before)
        assert (out[:, :3] - causal).abs().max() <= 1e-10
        after = model.hidden_states(noisy, cache=before, layout=Rows(0))
        assert (out[:, 3:] - after).abs().max() <= 1e-10


def test_bad_two_stream_inputs(tiny_models):
    model = tiny_models["qwen3_5"][0]
    x0 = torch.randint(0, 90, (1, 12))
    with pytest.raises(ValueError, match="block-aligned"):
        model.two_stream_hidden(x0, x0[:, None], _docs([5, 7], 12), 4)
    with pytest.raises(ValueError, match="block_size"):
        model.two_stream_hidden(x0, x0[:, None], _docs([12], 12), 0)
    with pytest.raises(ValueError, match="xt must be"):
        model.two_stream_hidden(x0, x0, _docs([12], 12), 4)
    with pytest.raises(ValueError, match="doc_ids"):
        model.hidden_states(x0, layout=Packed(_docs([12], 12)[:, :5]))


def test_per_stream_attention_equals_the_full_mask():
    """The CPU path splits two-stream attention by stream; it must equal one pass under the full mask."""
    from flare import masks
    from flare.model.attention import _per_stream
    from flare.model.context import _stream_masks
    from flare.ops.attention import attention

    L, V = 12, 2
    doc_ids = _docs([6, 6], L)
    rule = masks.two_stream(doc_ids, 3)
    q = torch.randn(1, (1 + V) * L, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, 1, (1 + V) * L, 2, 8, dtype=torch.float64)
    full = attention(q, k, v, masks.materialize(rule, 1, (1 + V) * L, (1 + V) * L, "cpu"), 0.3)
    spans = [range((i + 1) * L, (i + 2) * L) for i in range(V)]
    split = _per_stream(q, k, v, _stream_masks(rule, 1, L, spans, "cpu"), 0.3)
    assert (full - split).abs().max() <= 1e-12
    # A noisy stream of kept blocks only (one span of them, padded): same rule, same split.
    kept = NoisyBlocks(torch.tensor([[0, 1, 0]]), torch.tensor([[1, 3, -1]]), 3)
    rule = masks.two_stream(doc_ids, 3, "token", kept.row_view, kept.row_pos)
    T = L + kept.rows
    full = attention(q[:, :T], k[:, :T], v[:, :T], masks.materialize(rule, 1, T, T, "cpu"), 0.3)
    split = _per_stream(q[:, :T], k[:, :T], v[:, :T], _stream_masks(rule, 1, L, [range(L, T)], "cpu"), 0.3)
    assert (full - split).abs().max() <= 1e-12
