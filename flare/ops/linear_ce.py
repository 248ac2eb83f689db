"""Summed LM-head cross-entropy without the full-vocabulary logits: a chunked linear + cross-entropy.

The loss ``sum_i CE(hidden_i @ weight.T, target_i)`` computed the plain way holds [N, V] logits, their fp32 copy
and the gradients of both: at a 248,320-token vocabulary and thousands of supervised rows, tens of GB. Here the
rows go through the head a chunk at a time. Forward keeps no logits (only its inputs are saved), and backward
recomputes each chunk's logits and writes its gradients directly (softmax minus one-hot), the head's into one fp32
buffer, a slab of vocabulary rows at a time. Peak memory is O(chunk_rows * V) rather than O(N * V), with no
[V, E] temporary, for one extra head matmul per chunk. Forward runs the plain computation (``linear_cross_entropy_reference``) per chunk.

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
    """Forward sums the chunks' losses without a graph (each chunk is ``linear_cross_entropy_reference``);
    backward recomputes each chunk's logits and writes its gradients directly: softmax minus the target's one-hot,
    into the chunk's rows of the hidden gradient and into one fp32 head gradient (from GEMMs in the compute
    dtype, as ``F.linear``'s backward would run them)."""

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
        acc = accum_dtype(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        # The head's gradient sums over every chunk, accumulated in place in fp32 (fp64 for fp64): no [V, E]
        # temporary per chunk, whatever the compute dtype.
        grad_w = torch.zeros(weight.shape, dtype=accum_dtype(weight.dtype), device=weight.device) if need_w else None
        scale = grad_total.to(acc)
        with _no_autocast(hidden.device.type):
            w = cast(weight, dtype)
            for start in range(0, hidden.shape[0] if need_h or need_w else 0, chunk_rows):
                rows = slice(start, start + chunk_rows)
                h, t = cast(hidden[rows], dtype), targets[rows]
                logits = F.linear(h, w)
                if masked_id is not None:
                    logits.index_fill_(-1, torch.tensor([masked_id], device=logits.device), float("-inf"))
                # d(sum CE)/d logits = softmax - one_hot(target), zero for ignored rows, times the incoming grad.
                d = torch.softmax(logits.to(acc), dim=-1)
                del logits
                keep = (t != ignore_index).to(acc)[:, None]
                d.scatter_add_(1, t.clamp(min=0)[:, None], -keep)
                d.mul_(keep * scale)
                if need_h:
                    grad_h[rows] = (d.to(dtype) @ w).to(hidden.dtype)
                if need_w:
                    _accumulate_head_grad(grad_w, d, h)
        return grad_h, cast(grad_w, weight.dtype) if need_w else None, None, None, None, None, None


def _accumulate_head_grad(grad_w: torch.Tensor, d: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w [V, E] += d.T [V, n] @ h [n, E]. In h's (compute) dtype when it is narrower than grad_w's, a slab
    of vocabulary rows at a time (a bf16 GEMM, several times an fp32 one's speed on CPUs with AMX and on GPUs,
    its temporary bounded by the slab), else in place in grad_w's dtype."""
    if h.dtype == grad_w.dtype:
        grad_w.addmm_(d.t(), h)
        return
    dt = d.t().to(h.dtype)
    slab = max(1, CHUNK_BYTES // (h.element_size() * h.shape[1]))
    for start in range(0, grad_w.shape[0], slab):
        grad_w[start:start + slab] += dt[start:start + slab] @ h


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
