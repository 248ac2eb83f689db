"""Every attention visibility rule, as a predicate; the only place masks are built.

A rule is a ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (flex attention's signature): it takes broadcastable index
tensors for the batch row, head, query row and key column and says whether the query may see the key.
``materialize`` evaluates one into the dense boolean mask [B, 1, Tq, Tk] that SDPA takes on CPU;
``block_mask`` turns any rule into a flex-attention BlockMask by evaluating it densely; the training layouts'
BlockMasks are built tile by tile, never dense, by ``flare.block_mask``.

The training rules (method §2.1) and the inference rules (§3) are written side by side so that their
correspondence can be read off here and is tested: a run of noisy rows after clean context sees exactly what a
training noisy block sees.
"""

from __future__ import annotations

from typing import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

CLEAN_READOUTS = ("token", "block")

# Marker for "every key is visible" (no mask tensor at all), e.g. a single decode step of a single sequence.
ALL_VISIBLE = "all_visible"


def materialize(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device: torch.device | str) -> torch.Tensor:
    """Dense boolean mask [B, 1, Tq, Tk] (True = visible)."""
    return materialize_at(mask_mod, batch, torch.arange(q_len, device=device), torch.arange(kv_len, device=device))


def materialize_at(mask_mod: MaskMod, batch: int, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """The dense mask of ``mask_mod`` restricted to the given query rows and key columns [B, 1, |q|, |kv|]."""
    b = torch.arange(batch, device=q_idx.device)[:, None, None, None]
    h = torch.zeros(1, dtype=torch.long, device=q_idx.device)[:, None, None, None]
    q, kv = q_idx[None, None, :, None], kv_idx[None, None, None, :]
    return mask_mod(b, h, q, kv).expand(batch, 1, q_idx.numel(), kv_idx.numel())


def block_mask(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device: torch.device | str):
    """The same rule as a flex-attention BlockMask, through torch's ``create_block_mask``, which evaluates the rule
    densely ([B, 1, Tq, Tk]) first: for small or irregular rules. The training layouts (packed, two-stream) build
    theirs tile by tile, never dense: ``flare.block_mask``."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=device)


# ----------------------------------------------------------------------------------------------------- decoding
def causal_from(offsets_B: torch.Tensor) -> MaskMod:
    """Query row q of sequence b sits at position offsets[b] + q; key column kv is cache slot kv (== position).

    Plain causal decoding over a KV cache whose new rows were just written (offsets = committed lengths).
    """

    def mask_mod(b, h, q, kv):
        return kv <= offsets_B[b] + q

    return mask_mod


def after_committed(block_B1TT: torch.Tensor, committed: int) -> torch.Tensor:
    """The dense mask [B, 1, T, committed + T] of a rows rule (``inference_rows``, ``inference_tree``) when every
    sequence has exactly ``committed`` tokens in the cache: the committed columns are all visible, and the rows'
    own columns are the rule's ``block`` [B, 1, T, T] evaluated after an empty cache."""
    B, _, T, _ = block_B1TT.shape
    return torch.cat([block_B1TT.new_ones(B, 1, T, committed), block_B1TT], dim=-1)


def inference_rows(lengths_B: torch.Tensor, num_clean_B: torch.Tensor, num_rows_B: torch.Tensor) -> MaskMod:
    """Rows [clean x num_clean[b] ; noisy ; padding] after a cache, which they do not commit to (method §3).

    Key column kv is cache slot kv: slots below lengths[b] hold committed tokens; the forward's own row r sits in
    scratch slot lengths[b] + r, of which the first num_rows[b] are real. Clean rows are causal among
    themselves; noisy rows see every clean row and the whole noisy block: exactly what a training noisy block
    sees of its clean prefix and of itself. A padding row also sees its own slot, so that no row is fully
    masked (an empty sequence's padding rows would otherwise attend to nothing).
    """

    def mask_mod(b, h, q, kv):
        r = kv - lengths_B[b]
        own = (r >= 0) & (r < num_rows_B[b]) & ((r <= q) | (q >= num_clean_B[b]))
        return (r < 0) | own | ((r == q) & (q >= num_rows_B[b]))

    return mask_mod


def inference_tree(lengths_B: torch.Tensor, sees_BTT: torch.Tensor, real_BT: torch.Tensor) -> MaskMod:
    """Rows after a cache arranged as a tree (``flare.model.row_tree``): the forward's row r sits in scratch slot
    lengths[b] + r; row q sees every committed slot and the rows ``sees[b, q]`` allows (a clean row its clean
    ancestors, a noisy row its group's clean prefix and its whole group). A padding row sees its own slot."""
    T = real_BT.shape[1]

    def mask_mod(b, h, q, kv):
        r = kv - lengths_B[b]
        rr = r.clamp(0, T - 1)
        own = (r >= 0) & (r < T) & sees_BTT[b, q, rr]
        return (r < 0) | own | ((r == q) & ~real_BT[b, q])

    return mask_mod


# ----------------------------------------------------------------------------------------------------- training
def packed_causal(doc_ids_BL: torch.Tensor) -> MaskMod:
    """Causal within each document of a packed row (documents are contiguous runs of one id)."""

    def mask_mod(b, h, q, kv):
        return (kv <= q) & (doc_ids_BL[b, q] == doc_ids_BL[b, kv])

    return mask_mod


def two_stream(doc_ids_BL: torch.Tensor, block_size: int, clean_readout: str = "token",
               noisy_view_BN: torch.Tensor | None = None, noisy_pos_BN: torch.Tensor | None = None) -> MaskMod:
    """The training mask over ``[x0 ; xt_1 ; ... ; xt_V]`` (length (1+V)L): stream = idx // L, pos = idx % L.

    clean q, clean k: pos_k <= pos_q (``clean_readout="block"``: blk_k <= blk_q, the block-causal clean stream of
    plain block diffusion); clean q, noisy k: never; noisy q, clean k: blk_k < blk_q; noisy q, noisy k: same
    view and blk_k == blk_q. Everything ANDed with "same document". Document starts must be block-aligned so
    that pos // block_size numbers each document's own blocks.

    With ``noisy_view_BN`` and ``noisy_pos_BN`` the noisy stream after the L clean rows holds only some blocks
    (``flare.model.noisy_blocks``): noisy row i is position ``noisy_pos[b, i]`` of view ``noisy_view[b, i]``
    (view -1: a padding row, which sees only itself). Same rule.
    """
    if clean_readout not in CLEAN_READOUTS:
        raise ValueError(f"clean_readout must be one of {CLEAN_READOUTS}, got {clean_readout!r}")
    L = doc_ids_BL.shape[1]
    if noisy_view_BN is None:
        def stream_pos(b, i):
            return i // L, i % L
    else:
        B, dev = doc_ids_BL.shape[0], doc_ids_BL.device
        noisy_stream = torch.where(noisy_view_BN < 0, -1, noisy_view_BN + 1)
        stream_of = torch.cat([torch.zeros(B, L, dtype=torch.long, device=dev), noisy_stream], 1)
        pos_of = torch.cat([torch.arange(L, device=dev).expand(B, L), noisy_pos_BN], 1)

        def stream_pos(b, i):
            return stream_of[b, i], pos_of[b, i]

    def mask_mod(b, h, q, kv):
        sq, pq = stream_pos(b, q)
        sk, pk = stream_pos(b, kv)
        bq, bk = pq // block_size, pk // block_size
        if clean_readout == "token":
            clean_clean = pk <= pq
        else:
            clean_clean = bk <= bq
        visible = torch.where(
            sq == 0,
            (sk == 0) & clean_clean,
            torch.where(sk == 0, bk < bq, (sk == sq) & (bk == bq)),
        )
        visible = visible & (doc_ids_BL[b, pq] == doc_ids_BL[b, pk])
        return (visible & (sq >= 0) & (sk >= 0)) | ((sq < 0) & (q == kv))

    return mask_mod
