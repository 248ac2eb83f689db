"""Summed LM-head cross-entropy without the full-vocabulary logits: a chunked linear + cross-entropy.

The loss ``sum_i CE(hidden_i @ weight.T, target_i)`` computed the plain way holds [N, V] logits, their fp32 copy
and the gradients of both: at a 248,320-token vocabulary and thousands of supervised rows, tens of GB. Here the
rows go through the head a chunk at a time. Forward keeps no logits (only its inputs are saved), and backward
recomputes each chunk and differentiates it on the spot: gradient checkpointing, a chunk of rows at a time. Peak
memory is O(chunk_rows * V) rather than O(N * V), for one extra head matmul per chunk. Each chunk runs the plain
computation (``linear_cross_entropy_reference``), so one chunk gives exactly its value and gradients.

The [MASK] column (an input-only token, never predicted) is -inf, as in ``FlareModel.logits``. Under autocast
the head matmul runs in the autocast dtype, as ``F.linear`` would; the softmax, the loss and the head's gradient
accumulate in fp32 (fp64 stays fp64, see ``flare.ops.precision``). Targets equal to ``ignore_index`` count for
nothing. There is no fused CUDA kernel: the chunks are plain torch ops on every device.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from flare.ops.precision import accum_dtype, cast

IGNORE_INDEX = -100
# A chunk's fp32 logits. Its [rows, V] temporaries (logits, the masked fp32 copy, log-softmax, their gradients)
# come to a few times this at the peak of a chunk's backward.
CHUNK_BYTES = 256 * 2**20


def default_chunk_rows(vocab_size: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk's fp32 logits take at most ``budget_bytes`` (at least one row)."""
    return max(1, budget_bytes // (4 * max(vocab_size, 1)))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` computes in: the autocast dtype where autocast is on (fp64 is never
    autocast), else the inputs' common dtype."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if dtype != torch.float64 and _autocast_on(device) else dtype


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def _no_autocast(device_type: str):
    """Autocast off on this device (the chunks cast to the compute dtype themselves)."""
    return torch.autocast(device_type, enabled=False) if _autocast_on(device_type) else nullcontext()


class _LinearCrossEntropySum(torch.autograd.Function):
    """Forward sums the chunks' losses without a graph; backward reruns each chunk under autograd and
    differentiates it (gradient checkpointing, one chunk of rows at a time). Each chunk is
    ``linear_cross_entropy_reference`` itself, so a single chunk gives exactly the full-logits result."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, chunk_rows, masked_id, ignore_index):
        ctx.save_for_backward(hidden, weight, targets)
        ctx.options = dtype, chunk_rows, masked_id, ignore_index
        total = torch.zeros((), dtype=accum_dtype(dtype), device=hidden.device)
        with _no_autocast(hidden.device.type):
            w = cast(weight, dtype)
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                total += linear_cross_entropy_reference(cast(hidden[rows], dtype), w, targets[rows],
                                                        masked_id=masked_id, ignore_index=ignore_index)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        hidden, weight, targets = ctx.saved_tensors
        dtype, chunk_rows, masked_id, ignore_index = ctx.options
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        # The head's gradient sums over every chunk: accumulated in fp32 (fp64 for fp64), cast back at the end.
        grad_w = torch.zeros(weight.shape, dtype=accum_dtype(weight.dtype), device=weight.device) if need_w else None
        with _no_autocast(hidden.device.type), torch.enable_grad():
            w = cast(weight.detach(), dtype).requires_grad_(need_w)
            for start in range(0, hidden.shape[0] if need_h or need_w else 0, chunk_rows):
                rows = slice(start, start + chunk_rows)
                h = cast(hidden[rows].detach(), dtype).requires_grad_(need_h)
                loss = linear_cross_entropy_reference(h, w, targets[rows], masked_id=masked_id,
                                                      ignore_index=ignore_index)
                grads = torch.autograd.grad(loss, [x for x in (h, w) if x.requires_grad], grad_total)
                if need_h:
                    grad_h[rows] = grads[0]
                if need_w:
                    grad_w += grads[-1]
        return grad_h, cast(grad_w, weight.dtype) if need_w else None, None, None, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    masked_id: int | None = None,
    chunk_rows: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight.T, targets_i) for hidden [N, E], weight [V, E], targets [N], as a scalar in the
    accumulation dtype (fp32; fp64 for fp64 inputs), computed ``chunk_rows`` rows at a time (default: from
    ``CHUNK_BYTES``). Column ``masked_id`` of the logits is -inf; ``ignore_index`` targets are skipped. N = 0 gives
    a 0 that is still in the graph."""
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    dtype = _compute_dtype(hidden, weight)
    return _LinearCrossEntropySum.apply(hidden, weight, targets, dtype, chunk_rows, masked_id, ignore_index)


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    masked_id: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The same sum from full [N, V] logits (the plain computation, for tests): O(N * V) memory."""
    logits = F.linear(hidden, weight)
    if masked_id is not None:
        logits = logits.index_fill(-1, torch.tensor([masked_id], device=logits.device), float("-inf"))
    logits = logits.to(accum_dtype(logits.dtype))
    return F.cross_entropy(logits, targets, reduction="sum", ignore_index=ignore_index)
