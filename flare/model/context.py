"""What one forward pass needs to know besides the hidden states: positions, masks, cache and write slots."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flare import masks
from flare.model.cache import ModelCache
from flare.model.layers import rotary_cos_sin


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [B, T] RoPE index of each row
    cos: torch.Tensor  # [B, T, 1, R]
    sin: torch.Tensor  # [B, T, 1, R]
    attn_mask: torch.Tensor | None  # [B, 1, T, S] bool, or None for plain causal over the T rows
    cache: ModelCache | None
    write_pos: torch.Tensor | None  # [B, T] cache slot of each row
    n_new: torch.Tensor | None  # [B] rows of each sequence that are real (right padding after them)
    valid: torch.Tensor | None  # [B, T] bool

    @classmethod
    def build(
        cls,
        input_ids_BT: torch.Tensor,
        *,
        rotary_dim: int,
        rope_theta: float,
        dtype: torch.dtype,
        cache: ModelCache | None = None,
        valid_BT: torch.Tensor | None = None,
    ) -> "ForwardContext":
        B, T = input_ids_BT.shape
        device = input_ids_BT.device
        steps = torch.arange(T, device=device)
        n_new = valid_BT.sum(1) if valid_BT is not None else None
        if cache is None:
            positions = steps.expand(B, T)
            mask = None if valid_BT is None else masks.causal_over_cache(positions, T)
            write_pos = None
        else:
            cache.reserve(T)
            positions = cache.lengths[:, None] + steps
            write_pos = positions
            mask = masks.causal_over_cache(positions, cache.bound + T)
        cos, sin = rotary_cos_sin(positions, rotary_dim, rope_theta, dtype)
        return cls(positions, cos, sin, mask, cache, write_pos, n_new, valid_BT)
