"""Softmax attention with an explicit mask: the SDPA path (dense boolean mask, CPU and GPU) and the flex path
(a BlockMask compiled from the same predicate, GPU), behind one signature."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def attention(
    q_BTHD: torch.Tensor,
    k_BSGD: torch.Tensor,
    v_BSGD: torch.Tensor,
    mask,
    scale: float,
) -> torch.Tensor:
    """Grouped-query attention. ``mask``: a boolean [B, 1, T, S] tensor (True = visible), a flex-attention
    BlockMask, or None for plain causal with S == T. Returns [B, T, H, D]; H must be a multiple of G."""
    q, k, v = (x.transpose(1, 2) for x in (q_BTHD, k_BSGD, v_BSGD))
    if isinstance(mask, str):  # masks.ALL_VISIBLE
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    elif mask is not None and not isinstance(mask, torch.Tensor):
        out = _flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
    else:
        out = masked_sdpa(q, k, v, mask, scale, expand_kv=q.is_cuda and mask is not None)
    return out.transpose(1, 2)


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                expand_kv: bool) -> torch.Tensor:
    """SDPA over [B, H, T, D] queries and [B, G, S, D] keys/values. With ``expand_kv`` the G key/value heads are
    repeated to H first: on CUDA no fused kernel takes both a mask and grouped heads, and the math fallback
    would materialise every score in fp32, while the memory-efficient kernel takes a mask over full heads."""
    if expand_kv and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


@functools.lru_cache(maxsize=1)
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
