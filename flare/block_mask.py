"""The training layouts' flex-attention BlockMask, built tile by tile: never a dense [T, T] mask.

torch's ``create_block_mask`` evaluates the rule on every (query, key) pair before it reduces the result to
tiles: [B, 1, T, T] booleans, 1.7 GiB per row for a two-stream row of two 4,096-token views. The packed and
two-stream rules of ``flare.masks`` have a structure that lets each tile be classified from a few numbers per
tile and per position instead, in O(B * (T / tile)^2) work and memory:

Within one stream pair, what query position p sees among the key positions of a row is one interval
[lo(p), hi(p)] (empty where lo > hi), and both ends never decrease with p: every rule is "same document" (the
run of equal ids around p: [doc_start(p), doc_end(p)]) ANDed with one of

- causal (packed rows; clean rows with ``clean_readout="token"``): keys <= p;
- block causal (clean rows, ``clean_readout="block"``): keys up to the end of p's block;
- earlier blocks (a noisy row over clean keys): keys before the start of p's block;
- own block (a noisy row over its own view's keys);
- never (a clean row over noisy keys, a view over another view).

So a query piece [a0, a1] and a key piece [c0, c1] of one stream each are fully visible iff lo(a1) <= c0 and
hi(a0) >= c1, and share a visible pair iff some p in [a0, a1] has lo(p) <= c1, hi(p) >= c0 and lo(p) <= hi(p):
the first two bound p to a range found by binary search, the third is a prefix-sum count over that range. A
tile that straddles streams (L not a multiple of the tile) is the union of its pieces; a tile that runs past
the end of the row is never "full" (as in torch's own padding). The classification is exact, tile for tile,
against the dense rule; partial tiles keep the rule itself as their ``mask_mod``.

"Same document" compares ids, which equals "same run" when each id makes one run per row (the documents of
``flare.model.segments``). A row where some id comes back after another one is still handled soundly: its
tiles that are not fully visible all become partial, and the rule decides inside them.

Built masks are kept in a small LRU keyed on the layout and on the identity of the ``doc_ids`` tensor (its data
pointer, shape, strides and version counter; the entry holds the tensor, so its memory cannot be reused by
another one while the entry lives), so repeated forwards over one layout build once. The classification reads
nothing back to the host: it runs on the device of doc_ids.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from flare import masks

TILE = 128  # flex attention's default tile (torch's _DEFAULT_SPARSE_BLOCK_SIZE)
CACHE_SIZE = 4
_cache: OrderedDict = OrderedDict()


def packed(doc_ids_BL: torch.Tensor, *, tile: int = TILE):
    """BlockMask of ``masks.packed_causal(doc_ids)`` over a packed row of L tokens (T = L)."""
    _check(doc_ids_BL, tile)
    return _cached(("packed", tile), doc_ids_BL, lambda: _build(doc_ids_BL, 1, 0, "token", tile))


def two_stream(doc_ids_BL: torch.Tensor, block_size: int, views: int = 1, clean_readout: str = "token", *,
               tile: int = TILE):
    """BlockMask of ``masks.two_stream(doc_ids, block_size, clean_readout)`` over ``[x0 ; xt_1 ; ... ; xt_V]``
    (T = (1 + views) L)."""
    _check(doc_ids_BL, tile)
    if clean_readout not in masks.CLEAN_READOUTS:
        raise ValueError(f"clean_readout must be one of {masks.CLEAN_READOUTS}, got {clean_readout!r}")
    if block_size < 1 or views < 1:
        raise ValueError(f"block_size and views must be >= 1, got {block_size} and {views}")
    key = ("two_stream", tile, block_size, views, clean_readout)
    return _cached(key, doc_ids_BL, lambda: _build(doc_ids_BL, block_size, views, clean_readout, tile))


def clear_cache() -> None:
    _cache.clear()


def _check(doc_ids_BL: torch.Tensor, tile: int) -> None:
    if doc_ids_BL.ndim != 2 or doc_ids_BL.shape[1] == 0:
        raise ValueError(f"doc_ids must be [batch, tokens] with tokens > 0, got {tuple(doc_ids_BL.shape)}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")


def _cached(layout: tuple, doc_ids_BL: torch.Tensor, build):
    try:
        version = doc_ids_BL._version
        key = (*layout, doc_ids_BL.data_ptr(), tuple(doc_ids_BL.shape), doc_ids_BL.stride(), doc_ids_BL.dtype,
               doc_ids_BL.device, version)
    except RuntimeError:  # an inference tensor tracks no version: nothing says whether it changed since
        return build()
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit[1]
    mask = build()
    _cache[key] = (doc_ids_BL, mask)
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return mask


def _build(doc_ids_BL: torch.Tensor, block_size: int, views: int, clean_readout: str, tile: int):
    from torch.nn.attention.flex_attention import BlockMask

    # The rule reads its own copy: a caller editing doc_ids in place later cannot change a built mask.
    ids = doc_ids_BL.detach().clone()
    if views == 0:
        rule, streams = masks.packed_causal(ids), 1
    else:
        rule, streams = masks.two_stream(ids, block_size, clean_readout), 1 + views
    partial, full = classify(ids, block_size, streams, clean_readout, tile)
    T = streams * ids.shape[1]
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tile, mask_mod=rule,
                                    seq_lengths=(T, T))


def classify(doc_ids_BL: torch.Tensor, block_size: int, streams: int, clean_readout: str, tile: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) tiles [B, 1, n, n] bool, n = ceil(streams * L / tile), of the packed rule
    (``streams == 1``) or the two-stream rule (``streams == 1 + views``); empty tiles are in neither."""
    B, L = doc_ids_BL.shape
    device = doc_ids_BL.device
    T = streams * L
    n = -(-T // tile)
    spans = _Spans(doc_ids_BL, block_size)
    intervals = {}  # relation -> (lo, hi, ok_prefix) per row [B, L] ([B, L + 1] for the prefix)

    first = torch.arange(n, device=device) * tile
    last = torch.clamp(first + tile, max=T) - 1
    pieces = []  # per stream: (a0, a1, present) [n] in that stream's positions
    for s in range(streams):
        lo, hi = torch.clamp(first, min=s * L), torch.clamp(last, max=(s + 1) * L - 1)
        present = lo <= hi
        pieces.append(((lo - s * L).clamp(0, L - 1), (hi - s * L).clamp(0, L - 1), present))

    any_visible = torch.zeros(B, n, n, dtype=torch.bool, device=device)
    all_full = torch.ones(B, n, n, dtype=torch.bool, device=device)
    for sq in range(streams):
        a0, a1, q_present = pieces[sq]
        for sk in range(streams):
            c0, c1, k_present = pieces[sk]
            present = q_present[:, None] & k_present[None, :]
            relation = _relation(sq, sk, clean_readout, streams)
            if relation is None:
                all_full &= ~present
                continue
            if relation not in intervals:
                intervals[relation] = spans.interval(relation)
            visible, full = _pair(*intervals[relation], a0, a1, c0, c1)
            any_visible |= present & visible
            all_full &= ~present | full

    # A tile that runs past the row's end is padded with invisible entries (as torch pads): never full.
    whole = (last - first + 1) == tile
    full = all_full & whole[None, :, None] & whole[None, None, :]
    partial = any_visible & ~full
    # Some id makes more than one run: "same document" is then wider than "same run"; let the rule decide.
    partial = torch.where(spans.repeated[:, None, None], ~full, partial)
    return partial[:, None], full[:, None]


def _relation(sq: int, sk: int, clean_readout: str, streams: int) -> str | None:
    if streams == 1:
        return "causal"
    if sq == 0:
        if sk != 0:
            return None
        return "causal" if clean_readout == "token" else "block_causal"
    if sk == 0:
        return "earlier_blocks"
    return "own_block" if sk == sq else None


class _Spans:
    """Per-position document and block bounds of each row."""

    def __init__(self, doc_ids_BL: torch.Tensor, block_size: int):
        B, L = doc_ids_BL.shape
        device = doc_ids_BL.device
        self.pos = torch.arange(L, device=device).expand(B, L)
        change = doc_ids_BL[:, 1:] != doc_ids_BL[:, :-1]  # [B, L - 1]: a new run starts at p + 1
        true = torch.ones(B, 1, dtype=torch.bool, device=device)
        starts, ends = torch.cat([true, change], 1), torch.cat([change, true], 1)
        self.doc_start = torch.cummax(torch.where(starts, self.pos, 0), 1).values
        self.doc_end = torch.cummin(torch.where(ends, self.pos, L - 1).flip(1), 1).values.flip(1)
        self.block_start = self.pos // block_size * block_size
        self.block_end = self.block_start + block_size - 1
        ordered = doc_ids_BL.sort(1).values
        distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(1)
        self.repeated = change.sum(1) > distinct  # [B]

    def interval(self, relation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo, hi = self.doc_start, self.doc_end
        if relation == "causal":
            hi = torch.minimum(hi, self.pos)
        elif relation == "block_causal":
            hi = torch.minimum(hi, self.block_end)
        elif relation == "earlier_blocks":
            hi = torch.minimum(hi, self.block_start - 1)
        elif relation == "own_block":
            lo, hi = torch.maximum(lo, self.block_start), torch.minimum(hi, self.block_end)
        else:
            raise ValueError(f"unknown relation {relation!r}")
        ok = (lo <= hi).to(torch.int32).cumsum(1, dtype=torch.int32)
        prefix = torch.cat([torch.zeros_like(ok[:, :1]), ok], 1)
        return lo.contiguous(), hi.contiguous(), prefix


def _pair(lo, hi, prefix, a0, a1, c0, c1) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible somewhere, visible everywhere) [B, nq, nk] for query pieces [a0, a1] [nq] over key pieces
    [c0, c1] [nk], where query p sees keys [lo[p], hi[p]] (lo and hi non-decreasing along each row)."""
    B, L = lo.shape
    nq, nk = a0.numel(), c0.numel()
    # Queries whose interval reaches the piece: lo(p) <= c1 for p <= p_hi, hi(p) >= c0 for p >= p_lo.
    p_hi = torch.searchsorted(lo, c1.expand(B, nk).contiguous(), right=True) - 1  # [B, nk]
    p_lo = torch.searchsorted(hi, c0.expand(B, nk).contiguous())
    x = torch.maximum(a0[None, :, None], p_lo[:, None, :])  # [B, nq, nk]
    y = torch.minimum(a1[None, :, None], p_hi[:, None, :])
    some = x <= y
    start = prefix.gather(1, x.clamp(0, L).reshape(B, -1)).view(B, nq, nk)
    stop = prefix.gather(1, (y + 1).clamp(0, L).reshape(B, -1)).view(B, nq, nk)
    visible = some & (stop > start)
    full = (lo.gather(1, a1.expand(B, nq))[:, :, None] <= c0[None, None, :]) & (
        hi.gather(1, a0.expand(B, nq))[:, :, None] >= c1[None, None, :])
    return visible, full


def _ordered(blocks_B1NN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count [B, 1, n], column indices [B, 1, n, n]) with each row's tiles first, in order (torch's layout)."""
    dense = blocks_B1NN.to(torch.int32)
    count = dense.sum(-1, dtype=torch.int32)
    order = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return count.contiguous(), order.contiguous()
