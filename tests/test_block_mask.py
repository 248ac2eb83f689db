"""flare.block_mask: the training layouts' BlockMask, built tile by tile, equals the dense rule tile for tile and
never builds a [T, T] mask on the way."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.attention.flex_attention as flex
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flare import block_mask, masks
from flare.model import context
from flare.model.context import ForwardContext, Packed, TwoStream
from tests.test_structure import _imports


@pytest.fixture(autouse=True)
def _fresh_cache():
    block_mask.clear_cache()
    yield
    block_mask.clear_cache()


def _doc_ids(B: int, L: int, align: int, rng: random.Random) -> torch.Tensor:
    """Random document lengths (multiples of ``align``, the last one cut at L), increasing ids with gaps."""
    rows = []
    for _ in range(B):
        ids, doc = [], rng.randint(0, 5)
        while len(ids) < L:
            ids += [doc] * (align * rng.choice([1, 1, 2, 3, 5, 9, 20]))
            doc += rng.randint(1, 3)
        rows.append(ids[:L])
    return torch.tensor(rows)


def _dense_tiles(dense_BQK: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) [B, n, n] from a dense mask, padded with invisible entries to whole tiles (torch's rule)."""
    B, Tq, Tk = dense_BQK.shape
    n, m = -(-Tq // tile), -(-Tk // tile)
    padded = torch.zeros(B, n * tile, m * tile, dtype=torch.long)
    padded[:, :Tq, :Tk] = dense_BQK.long()
    count = padded.view(B, n, tile, m, tile).sum((2, 4))
    full = count == tile * tile
    return (count > 0) & ~full, full


def _tiles(num_B1N: torch.Tensor, idx_B1NN: torch.Tensor) -> torch.Tensor:
    """[B, n, n] bool of the tiles listed in a BlockMask's (count, indices) pair."""
    B, _, n, m = idx_B1NN.shape
    out = torch.zeros(B, n, m, dtype=torch.bool)
    for b in range(B):
        for i in range(n):
            out[b, i, idx_B1NN[b, 0, i, :num_B1N[b, 0, i]].long()] = True
    return out


def _check_exact(bm: BlockMask, rule, B: int, T: int, tile: int) -> None:
    dense = masks.materialize(rule, B, T, T, "cpu")[:, 0]
    partial, full = _dense_tiles(dense, tile)
    assert bm.seq_lengths == (T, T) and bm.BLOCK_SIZE == (tile, tile)
    # (a) the partial / full split, tile for tile
    assert torch.equal(_tiles(bm.kv_num_blocks, bm.kv_indices), partial)
    assert torch.equal(_tiles(bm.full_kv_num_blocks, bm.full_kv_indices), full)
    # (b) torch's own reading of the BlockMask
    assert torch.equal(bm.to_dense()[:, 0].bool(), partial | full)
    # (c) inside partial tiles the mask_mod is the rule itself (on the builder's own copy of doc_ids)
    assert torch.equal(masks.materialize(bm.mask_mod, B, T, T, "cpu"), masks.materialize(rule, B, T, T, "cpu"))
    # ... and torch's dense-first builder agrees field for field (it runs on the CPU at these sizes)
    ref = create_block_mask(rule, B, None, T, T, device="cpu", BLOCK_SIZE=tile)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(bm, name), getattr(ref, name)), name


@pytest.mark.parametrize("seed", range(16))
def test_two_stream_equals_the_dense_rule_tile_for_tile(seed):
    rng = random.Random(seed)
    B, bs, V = rng.randint(2, 3), rng.randint(1, 4), 1 + seed % 2
    readout, tile = ("token", "block")[seed // 2 % 2], (8, 16)[seed // 4 % 2]
    L = rng.randint(5, 90)
    if ((1 + V) * L) % tile == 0:
        L += 1  # T not a multiple of the tile: the last tile is cut
    doc = _doc_ids(B, L, bs, rng)
    bm = block_mask.two_stream(doc, bs, V, readout, tile=tile)
    _check_exact(bm, masks.two_stream(doc, bs, readout), B, (1 + V) * L, tile)


@pytest.mark.parametrize("seed", range(8))
def test_packed_equals_the_dense_rule_tile_for_tile(seed):
    rng = random.Random(100 + seed)
    B, tile = rng.randint(2, 3), (8, 16)[seed % 2]
    L = rng.randint(tile + 1, 200)
    if L % tile == 0:
        L += 1
    doc = _doc_ids(B, L, 1, rng)
    _check_exact(block_mask.packed(doc, tile=tile), masks.packed_causal(doc), B, L, tile)


def test_tiles_straddling_streams_and_whole_rows():
    """L smaller than the tile (a tile holds several streams), L a multiple of it, one document per row."""
    for doc, bs, V, tile in [(torch.tensor([[0, 0, 1, 1, 1, 1], [3, 3, 3, 3, 3, 3]]), 2, 2, 8),
                             (torch.zeros(2, 32, dtype=torch.long), 4, 1, 16),
                             (torch.tensor([[0] * 16 + [1] * 16]), 4, 2, 8)]:
        for readout in masks.CLEAN_READOUTS:
            bm = block_mask.two_stream(doc, bs, V, readout, tile=tile)
            _check_exact(bm, masks.two_stream(doc, bs, readout), doc.shape[0], (1 + V) * doc.shape[1], tile)


def test_an_id_that_comes_back_is_still_sound():
    """Ids that make two runs in a row (off-contract): every tile the rule touches stays listed, no tile is
    called full that is not, so flex attention still computes the rule exactly."""
    doc = torch.tensor([[0] * 12 + [1] * 12 + [0] * 12 + [2] * 4, [5] * 40])
    for bm, rule, T in [(block_mask.two_stream(doc, 4, 1, tile=8), masks.two_stream(doc, 4), 80),
                        (block_mask.packed(doc, tile=8), masks.packed_causal(doc), 40)]:
        partial, full = _dense_tiles(masks.materialize(rule, 2, T, T, "cpu")[:, 0], 8)
        got_partial = _tiles(bm.kv_num_blocks, bm.kv_indices)
        got_full = _tiles(bm.full_kv_num_blocks, bm.full_kv_indices)
        assert not (got_full & ~full).any() and not ((partial | full) & ~(got_partial | got_full)).any()
        assert torch.equal(got_full[1], full[1]) and torch.equal(got_partial[1], partial[1])  # a clean row: exact


class _LargestTensor(TorchDispatchMode):
    """Records the most elements any op produced while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


def test_a_two_view_row_of_4096_never_goes_dense(monkeypatch):
    """T = 12,288 (clean + two views of 4,096, block 4, tile 128): no dense evaluation of the rule, and no tensor
    on the way is larger than a few [B, T/128, T/128] tile maps (a [T, T] mask would hold 151M entries)."""

    def dense(*args, **kwargs):
        raise AssertionError("the rule was evaluated densely")

    for module, name in [(masks, "materialize"), (masks, "materialize_at"), (masks, "block_mask"),
                         (flex, "create_mask"), (flex, "create_block_mask")]:
        monkeypatch.setattr(module, name, dense)
    L, B, T = 4096, 2, 12288
    doc = torch.cat([torch.full((B, 1000), 0), torch.full((B, 2000), 1), torch.full((B, L - 3000), 2)], 1)
    with _LargestTensor() as seen:
        bm = block_mask.two_stream(doc, 4, 2, "token")
    assert seen.numel <= 4 * B * (T // 128) ** 2
    assert tuple(bm.kv_indices.shape) == tuple(bm.full_kv_indices.shape) == (B, 1, 96, 96)
    assert bm.seq_lengths == (T, T) and bm.BLOCK_SIZE == (128, 128)
    listed = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    assert listed < 0.1 * B * 96 * 96  # sparse: a causal dense mask would list about half the tiles
    assert int(bm.full_kv_num_blocks.sum()) > int(bm.kv_num_blocks.sum())  # mostly full, few partial


def test_built_masks_are_reused_per_layout():
    doc = torch.tensor([[0] * 8 + [1] * 12, [2] * 20])
    first = block_mask.two_stream(doc, 4, 2, "token", tile=8)
    assert block_mask.two_stream(doc, 4, 2, "token", tile=8) is first
    assert block_mask.two_stream(doc, 4, 2, "block", tile=8) is not first
    assert block_mask.two_stream(doc, 4, 1, "token", tile=8) is not first
    assert block_mask.two_stream(doc, 4, 2, "token", tile=16) is not first
    assert block_mask.packed(doc, tile=8) is not block_mask.packed(doc, tile=16)

    # Editing doc_ids in place makes a new mask, and never changes one built before.
    before = masks.materialize(first.mask_mod, 2, 60, 60, "cpu")
    doc[1, 12:] = 3
    second = block_mask.two_stream(doc, 4, 2, "token", tile=8)
    assert second is not first
    _check_exact(second, masks.two_stream(doc, 4), 2, 60, 8)
    assert torch.equal(masks.materialize(first.mask_mod, 2, 60, 60, "cpu"), before)

    # An inference tensor tracks no version: built every time, still right.
    with torch.inference_mode():
        frozen = doc.clone()
    a, b = block_mask.packed(frozen, tile=8), block_mask.packed(frozen, tile=8)
    assert a is not b and torch.equal(a.kv_indices, b.kv_indices)

    for i in range(block_mask.CACHE_SIZE + 2):  # a small LRU
        block_mask.packed(torch.zeros(1, 10 + i, dtype=torch.long), tile=8)
    assert len(block_mask._cache) == block_mask.CACHE_SIZE


def test_forward_context_takes_the_tiled_mask_on_the_flex_path(monkeypatch):
    monkeypatch.setattr(context, "use_flex", lambda device: True)
    monkeypatch.setattr(masks, "block_mask", None)  # the dense-first builder is off these paths
    monkeypatch.setattr(flex, "create_block_mask", None)
    doc = torch.tensor([[0] * 8 + [1] * 8, [4] * 16])
    kw = dict(rotary_dim=8, head_dim=8, rope_theta=10000.0, dtype=torch.float32)
    ctx = ForwardContext.build(torch.zeros(2, 48, dtype=torch.long), layout=TwoStream(doc, 4, 2, "block"), **kw)
    assert ctx.mode == "two_stream" and ctx.attn_mask is block_mask.two_stream(doc, 4, 2, "block")
    ctx = ForwardContext.build(torch.zeros(2, 16, dtype=torch.long), layout=Packed(doc), **kw)
    assert ctx.mode == "packed" and ctx.attn_mask is block_mask.packed(doc)
    _check_exact(ctx.attn_mask, masks.packed_causal(doc), 2, 16, 128)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention kernels need a CUDA device")
def test_flex_attention_over_the_tiled_mask_matches_sdpa_on_cuda():
    """The kernels over the tiled BlockMask (T not a multiple of 128: a cut last tile) equal dense SDPA."""
    from flare.ops.attention import attention

    doc = _doc_ids(2, 200, 4, random.Random(7)).cuda()
    for bm, rule, T in [(block_mask.two_stream(doc, 4, 2), masks.two_stream(doc, 4), 600),
                        (block_mask.two_stream(doc, 4, 1, "block"), masks.two_stream(doc, 4, "block"), 400),
                        (block_mask.packed(doc), masks.packed_causal(doc), 200)]:
        q, k, v = (torch.randn(2, T, 4, 64, device="cuda") for _ in range(3))
        dense = attention(q, k, v, masks.materialize(rule, 2, T, T, "cuda"), 0.125)
        assert (dense - attention(q, k, v, bm, 0.125)).abs().max() < 1e-3


def test_bad_layouts_are_refused():
    doc = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="clean_readout"):
        block_mask.two_stream(doc, 2, 1, "none")
    with pytest.raises(ValueError, match="views"):
        block_mask.two_stream(doc, 2, 0)
    with pytest.raises(ValueError, match="tile"):
        block_mask.packed(doc, tile=0)
    with pytest.raises(ValueError, match="doc_ids"):
        block_mask.packed(torch.zeros(8, dtype=torch.long))


def test_imports_point_one_way():
    """flare.model.context -> flare.block_mask -> flare.masks, never back."""
    root = Path(block_mask.__file__).parent
    assert _imports(root / "block_mask.py") == {"masks"}
    assert "block_mask" not in _imports(root / "masks.py")
    assert "block_mask" in _imports(root / "model" / "context.py")
