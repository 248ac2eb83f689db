"""Gated delta rule (pure PyTorch): sequential reference and chunked forms.

Tensor contract shared by all entry points: q, k ``[B, T, H, Dk]``; v ``[B, T, H, Dv]``;
g, beta ``[B, T, H]``; initial_state ``[B, H, Dk, Dv]`` or ``None``. Outputs: o
``[B, T, H, Dv]`` (v's dtype) and the final state ``[B, H, Dk, Dv]`` (fp32).
"""

from __future__ import annotations

import torch

from .chunk import gated_delta_chunk
from .naive import gated_delta_naive, validate_inputs

__all__ = ["gated_delta", "gated_delta_chunk", "gated_delta_naive", "NAIVE_MAX_T"]

# Sequences up to this length (a decode step or a short verify block) use the
# sequential form; longer ones use the chunked form.
NAIVE_MAX_T = 16


def gated_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    prefer: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Run the gated delta rule with the form suited to the sequence length.

    Picks ``gated_delta_naive`` when ``T <= 16`` and ``gated_delta_chunk`` otherwise;
    ``prefer="naive"`` or ``prefer="chunk"`` forces a form (anything else raises
    ``ValueError``). Shapes as in the module docstring.

    Returns:
        ``(o [B, T, H, Dv], final_state [B, H, Dk, Dv] fp32, name)`` where ``name`` is
        ``"naive"`` or ``"chunk"``, the form that ran.
    """
    if prefer not in (None, "naive", "chunk"):
        raise ValueError(f"prefer must be None, 'naive' or 'chunk', got {prefer!r}")
    _, T, _, _, _ = validate_inputs(q, k, v, g, beta, initial_state)
    name = prefer if prefer is not None else ("naive" if T <= NAIVE_MAX_T else "chunk")
    if name == "naive":
        o, state = gated_delta_naive(q, k, v, g, beta, initial_state, scale)
    else:
        o, state = gated_delta_chunk(q, k, v, g, beta, initial_state, scale)
    return o, state, name
