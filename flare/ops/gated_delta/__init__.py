"""Gated delta rule (pure PyTorch, the reference): sequential, chunked and closed forms; an optional fused CUDA path.

Tensor contract shared by all entry points: q, k ``[B, T, Hk, Dk]`` with ``H % Hk == 0`` (value head h reads
q/k head ``h // (H / Hk)``); v ``[B, T, H, Dv]``;
g, beta ``[B, T, H]``; initial_state ``[B, H, Dk, Dv]`` or ``None``. Outputs: o
``[B, T, H, Dv]`` (v's dtype) and the final state ``[B, H, Dk, Dv]`` (fp32).

Every entry point computes in fp32 (fp64 for fp64 inputs) whatever the caller's autocast state: each is wrapped in
:func:`flare.ops.precision.no_autocast`, so under ``torch.autocast(dtype=bfloat16)`` only the projections around
the core run in bf16.

On a CUDA device with flash-linear-attention installed, the causal form of long sequences runs on its fused kernel
instead (see :mod:`flare.ops.gated_delta.fla` for what it covers; ``FLARE_GDN_BACKEND=torch`` turns it off).
"""

from __future__ import annotations

import torch

from flare.ops.gated_delta import fla
from flare.ops.gated_delta.chunk import chunk_size_for, gated_delta_chunk
from flare.ops.gated_delta.naive import gated_delta_naive, validate_inputs
from flare.ops.gated_delta.rows import RowsScan, gated_delta_rows
from flare.ops.gated_delta.step import gated_delta_step, read_state
from flare.ops.gated_delta.two_stream import gated_delta_two_stream, gated_delta_two_stream_reference

__all__ = ["gated_delta", "gated_delta_chunk", "gated_delta_naive", "gated_delta_rows", "gated_delta_step",
           "read_state", "RowsScan",
           "gated_delta_two_stream", "gated_delta_two_stream_reference", "NAIVE_MAX_T", "FORMS"]

FORMS = ("step", "naive", "chunk")

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
    check: bool = True,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Run the gated delta rule with the form suited to the sequence length.

    Picks ``gated_delta_step`` when ``T == 1``, ``gated_delta_naive`` when ``T <= 16`` and ``gated_delta_chunk``
    otherwise (in chunks of ``chunk_size_for(T)``), except that with ``prefer=None`` the chunk choice runs on
    flash-linear-attention's fused kernel (name ``"fla"``) where :func:`flare.ops.gated_delta.fla.selected` says it
    applies (CUDA, the package installed, 16-bit values, ``FLARE_GDN_BACKEND`` not ``torch``, a backward that runs
    where one will follow). ``prefer`` forces a
    torch form (one of ``FORMS``; ``"step"`` needs T == 1, anything else raises ``ValueError``). Shapes as in the
    module docstring. ``check=False`` skips the shape checks, for callers that built the tensors themselves (a
    model layer in a decode loop). ``in_place``: the step form writes the new state over ``initial_state`` (a
    cache's own state, read by nothing else); the other forms return a new one either way.

    Returns:
        ``(o [B, T, H, Dv], final_state [B, H, Dk, Dv] fp32, name)`` where ``name`` is the form that ran
        (one of ``FORMS``, or ``"fla"``).
    """
    if prefer not in (None, *FORMS):
        raise ValueError(f"prefer must be None or one of {FORMS}, got {prefer!r}")
    if check:
        validate_inputs(q, k, v, g, beta, initial_state)
    T, Dk = q.shape[1], q.shape[-1]
    if prefer == "step" and T != 1:
        raise ValueError(f"prefer='step' needs exactly one position, got T={T}")
    name = prefer or ("step" if T == 1 else "naive" if T <= NAIVE_MAX_T else "chunk")
    if name == "step":
        o, state = gated_delta_step(
            q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], initial_state, Dk**-0.5 if scale is None else scale,
            in_place=in_place,
        )
        o = o[:, None]
    elif name == "naive":
        o, state = gated_delta_naive(q, k, v, g, beta, initial_state, scale)
    elif prefer is None and fla.selected(q, v, torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (q, k, v, g, beta, initial_state))):
        o, state = fla.gated_delta_fla(q, k, v, g, beta, initial_state, scale)
        name = "fla"
    else:
        o, state = gated_delta_chunk(q, k, v, g, beta, initial_state, scale, chunk_size_for(T))
    return o, state, name
