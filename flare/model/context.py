"""What one forward pass needs to know besides the hidden states: its layout, positions, mask and cache.

Four layouts, one per way the model is run:

- ``causal``: ordinary rows, optionally continuing and writing a cache (prefill, decode steps);
- ``packed``: training rows holding several documents, causal within each (AR training);
- ``two_stream``: ``[x0 ; xt_1 ; ... ; xt_V]`` training rows, the FLARE objective's forward (method §2);
- ``rows``: inference rows ``[clean x num_clean ; noisy ...]`` that read a cache and never write it (§3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flare import masks
from flare.model.cache import ModelCache
from flare.model.layers import rotary_cos_sin
from flare.model.segments import Segments


@dataclass(frozen=True)
class Packed:
    doc_ids: torch.Tensor  # [B, L]


@dataclass(frozen=True)
class TwoStream:
    doc_ids: torch.Tensor  # [B, L]
    block_size: int
    views: int = 1
    clean_readout: str = "token"


@dataclass(frozen=True)
class Rows:
    num_clean: int


Layout = Packed | TwoStream | Rows | None


@dataclass
class ForwardContext:
    mode: str
    positions: torch.Tensor  # [B, T] RoPE index of each row
    cos: torch.Tensor  # [B, T, 1, R]
    sin: torch.Tensor  # [B, T, 1, R]
    attn_mask: torch.Tensor | None  # [B, 1, T, S] bool, or None for plain causal over the T rows
    cache: ModelCache | None = None
    write_pos: torch.Tensor | None = None  # [B, T] cache slot of each row (causal mode with a cache)
    n_new: torch.Tensor | None = None  # [B] real rows per sequence (right padding after them)
    valid: torch.Tensor | None = None  # [B, T] bool
    segments: Segments | None = None  # packed / two_stream: documents as segments
    layout: Layout = None

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
        layout: Layout = None,
    ) -> "ForwardContext":
        B, T = input_ids_BT.shape
        device = input_ids_BT.device
        steps = torch.arange(T, device=device)

        def rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return rotary_cos_sin(positions, rotary_dim, rope_theta, dtype)

        if isinstance(layout, (Packed, TwoStream)):
            if cache is not None or valid_BT is not None:
                raise ValueError("packed and two-stream forwards take neither a cache nor right padding")
            block = layout.block_size if isinstance(layout, TwoStream) else 1
            segments = Segments.from_doc_ids(layout.doc_ids, block)
            if isinstance(layout, Packed):
                if layout.doc_ids.shape != input_ids_BT.shape:
                    raise ValueError(f"doc_ids {tuple(layout.doc_ids.shape)} must match input_ids "
                                     f"{tuple(input_ids_BT.shape)}")
                rule, positions = masks.packed_causal(layout.doc_ids), segments.positions
                mode = "packed"
            else:
                L = layout.doc_ids.shape[1]
                if layout.views < 1 or T != (1 + layout.views) * L:
                    raise ValueError(f"a two-stream row holds (1 + views) * L = {(1 + layout.views) * L} tokens "
                                     f"(L={L}, views={layout.views}), got {T}")
                rule = masks.two_stream(layout.doc_ids, layout.block_size, layout.clean_readout)
                positions = segments.positions.repeat(1, 1 + layout.views)
                mode = "two_stream"
            mask = masks.materialize(rule, B, T, T, device)
            cos, sin = rope(positions)
            return cls(mode, positions, cos, sin, mask, segments=segments, layout=layout)

        if isinstance(layout, Rows):
            if cache is None:
                raise ValueError("inference rows read a cache: pass one")
            if not 0 <= layout.num_clean <= T:
                raise ValueError(f"num_clean must be in [0, {T}], got {layout.num_clean}")
            positions = cache.lengths[:, None] + steps
            span = cache.bound
            mask = masks.materialize(masks.inference_rows(cache.lengths, span, layout.num_clean), B, T, span + T,
                                     device)
            cos, sin = rope(positions)
            return cls("rows", positions, cos, sin, mask, cache=cache, layout=layout)

        if layout is not None:
            raise TypeError(f"unknown layout {layout!r}")
        n_new = valid_BT.sum(1) if valid_BT is not None else None
        if cache is None:
            positions = steps.expand(B, T)
            mask = None
            if valid_BT is not None:
                mask = masks.materialize(masks.causal_from(torch.zeros(B, dtype=torch.long, device=device)),
                                         B, T, T, device)
            write_pos = None
        else:
            cache.reserve(T)
            positions = cache.lengths[:, None] + steps
            write_pos = positions
            mask = masks.materialize(masks.causal_from(cache.lengths), B, T, cache.bound + T, device)
        cos, sin = rope(positions)
        return cls("causal", positions, cos, sin, mask, cache, write_pos, n_new, valid_BT)
