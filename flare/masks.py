"""Every visibility rule as a predicate ``(q, kv) -> bool``; the only place masks are built.

A predicate takes broadcastable index tensors of the query and key sides and says whether the query may see the
key. ``materialize`` turns one into the dense boolean mask [B, 1, Tq, Tk] that SDPA takes on CPU.
"""

from __future__ import annotations

from typing import Callable

import torch

Predicate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def causal(q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor:
    """A token sees itself and every earlier position of its sequence."""
    return kv_pos <= q_pos


def materialize(predicate: Predicate, q_BT: torch.Tensor, kv_BS: torch.Tensor) -> torch.Tensor:
    """Dense boolean mask [B, 1, Tq, Tk] of ``predicate`` over per-row query and key indices."""
    return predicate(q_BT[:, None, :, None], kv_BS[:, None, None, :])


def causal_over_cache(q_pos_BT: torch.Tensor, span: int) -> torch.Tensor:
    """New tokens at positions ``q_pos`` attending to cache slots 0..span-1 (slot index == position)."""
    kv = torch.arange(span, device=q_pos_BT.device).expand(q_pos_BT.shape[0], span)
    return materialize(causal, q_pos_BT, kv)
