"""Softmax attention with an explicit mask (SDPA path; the flex path joins it on GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q_BTHD: torch.Tensor,
    k_BSGD: torch.Tensor,
    v_BSGD: torch.Tensor,
    mask_B1TS: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Grouped-query attention. ``mask`` is boolean (True = visible); None means plain causal with S == T.

    Returns [B, T, H, D]. H must be a multiple of the G key/value heads.
    """
    q, k, v = (x.transpose(1, 2) for x in (q_BTHD, k_BSGD, v_BSGD))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask_B1TS, is_causal=mask_B1TS is None, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2)
