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
nothing. On CUDA with Triton the tile math (casts, exponentials, reductions, the one-hot scatter, scaling) runs
as fused kernels compiled from the same functions (``fused_available``; ``FLARE_FUSED_CE=0`` turns it off); the
GEMMs are the device's own everywhere.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from flare.ops.precision import accum_dtype, autocast_off, autocast_on, cast

IGNORE_INDEX = -100
# One tile of fp32 logits: rows x vocabulary columns. A tile's temporaries (its logits in the compute dtype and in
# fp32, their gradient in both) come to about three times this.
CHUNK_BYTES = 256 * 2**20
# Rows per block: the rows whose hidden states, cast to the compute dtype, and fp32 gradient are held at once.
ROW_BLOCK = 8192


def slab_columns(rows: int, vocab_size: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Vocabulary columns per tile so that ``rows`` rows of fp32 logits take at most ``budget_bytes``."""
    return min(vocab_size, max(1, budget_bytes // (4 * max(rows, 1))))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` computes in: the autocast dtype where autocast is on (fp64 is never
    autocast), else the inputs' common dtype."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if dtype != torch.float64 and autocast_on(device) else dtype


class _LinearCrossEntropySums(torch.autograd.Function):
    """Rows in blocks, the vocabulary in slabs; every tile [rows, columns] is computed twice (forward for the
    log-sum-exp, kept per row; backward for the softmax), never stored.

    Forward: an online log-sum-exp over the slabs in fp32 and the target's logit give each row's loss, summed per
    group. Backward: per tile, d = exp(logits - lse) minus the target's one-hot, times the group's incoming
    gradient; the hidden rows' gradient accumulates over the slabs in fp32, and each slab of the head's gradient
    is written once per row block (in place in fp32, from a GEMM in the compute dtype as ``F.linear``'s backward
    would run it). Both passes compute a tile with the same GEMM shape, so they see the same logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, groups, num_groups, dtype, chunk_rows, columns, masked_id,
                ignore_index):
        acc = accum_dtype(dtype)
        N = hidden.shape[0]
        lse = torch.empty(N, dtype=acc, device=hidden.device)
        picked = torch.zeros(N, dtype=acc, device=hidden.device)
        kernels = _kernels(hidden.device)
        with autocast_off(hidden.device.type):
            for rows in _blocks(N, chunk_rows):
                h, t = cast(hidden[rows], dtype), targets[rows]
                top = run = None
                for start, stop in _slabs(h.shape[0], weight.shape[0], columns):
                    logits = _tile(h, cast(weight[start:stop], dtype), start, masked_id)
                    at, inside = _target_columns(t, start, stop)
                    if top is None:
                        top, run, got = kernels.first_stats(logits, at, inside, acc)
                    else:
                        top, run, got = kernels.next_stats(logits, top, run, at, inside)
                    picked[rows] += got
                lse[rows] = top + torch.log(run)
            losses = (lse - picked).masked_fill_(targets == ignore_index, 0.0)
            sums = torch.zeros(num_groups, dtype=acc, device=hidden.device).index_add_(0, groups, losses)
        ctx.save_for_backward(hidden, weight, targets, groups, lse)
        ctx.options = dtype, chunk_rows, columns, masked_id, ignore_index
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sums):
        hidden, weight, targets, groups, lse = ctx.saved_tensors
        dtype, chunk_rows, columns, masked_id, ignore_index = ctx.options
        need_h, need_w = ctx.needs_input_grad[:2]
        acc = accum_dtype(dtype)
        N, V = hidden.shape[0], weight.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Written by the first row block, accumulated by the others (no zero-filled [V, E] to start from).
        grad_w = torch.empty(weight.shape, dtype=accum_dtype(weight.dtype), device=weight.device) if need_w else None
        # d(sum CE)/d logits = softmax - one_hot(target), zero for ignored rows, times the group's gradient.
        row_scale = grad_sums.to(acc)[groups].masked_fill_(targets == ignore_index, 0.0)
        kernels = _kernels(hidden.device)
        with autocast_off(hidden.device.type):
            for block, rows in enumerate(_blocks(N if need_h or need_w else 0, chunk_rows)):
                h, t = cast(hidden[rows], dtype), targets[rows]
                gh = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
                for start, stop in _slabs(h.shape[0], V, columns):
                    w = cast(weight[start:stop], dtype)
                    at, inside = _target_columns(t, start, stop)
                    d = kernels.grad(_tile(h, w, start, masked_id), lse[rows], at, inside, row_scale[rows])
                    if need_h:
                        gh += d @ w
                    if need_w:
                        part = d.t() @ h
                        if block:
                            grad_w[start:stop].add_(part)
                        else:
                            grad_w[start:stop].copy_(part)
                if need_h:
                    grad_h[rows] = gh
        if need_w and N == 0:
            grad_w.zero_()
        return (grad_h, cast(grad_w, weight.dtype) if need_w else None, *([None] * 8))


def _first_stats(logits, at, inside, acc: torch.dtype):
    """The first slab of a row block: (row max, sum of exp(logit - max), the target's logit or 0), in ``acc``."""
    x = logits.to(acc)
    top = x.amax(dim=1)
    run = torch.exp(x - top[:, None]).sum(dim=1)
    return top, run, x.gather(1, at[:, None])[:, 0].masked_fill(~inside, 0.0)


def _next_stats(logits, top, run, at, inside):
    """A later slab: the online log-sum-exp's max and running sum updated, and the target's logit or 0."""
    x = logits.to(top.dtype)
    m = torch.maximum(top, x.amax(dim=1))
    run = run * torch.exp(top - m) + torch.exp(x - m[:, None]).sum(dim=1)
    return m, run, x.gather(1, at[:, None])[:, 0].masked_fill(~inside, 0.0)


def _grad(logits, lse, at, inside, row_scale):
    """A tile's gradient of the summed loss with respect to its logits, in the logits' dtype: (softmax minus the
    target's one-hot) times each row's scale, computed in ``lse``'s dtype."""
    d = torch.exp(logits.to(lse.dtype) - lse[:, None])
    d = d.scatter_add(1, at[:, None], -inside.to(d.dtype)[:, None])
    return (d * row_scale[:, None]).to(logits.dtype)


class _Kernels(NamedTuple):
    first_stats: Callable
    next_stats: Callable
    grad: Callable


EAGER = _Kernels(_first_stats, _next_stats, _grad)
FUSED_ENV = "FLARE_FUSED_CE"


def fused_available(device: torch.device) -> bool:
    """Whether the tile math runs as fused kernels: on CUDA with Triton (torch.compile's GPU backend) present,
    unless ``FLARE_FUSED_CE=0``. Elsewhere the same functions run eagerly (on a CPU a compiled tile was no
    faster: its time is the GEMMs)."""
    if device.type != "cuda" or os.environ.get(FUSED_ENV, "1") == "0":
        return False
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=1)
def fused_kernels() -> _Kernels:
    """The tile functions under ``torch.compile`` (dynamic shapes: one kernel per function for every tile size):
    each tile's casts, exponentials, reductions, scatter and scaling in one pass instead of one per op."""
    return _Kernels(*(torch.compile(f, dynamic=True) for f in EAGER))


def _kernels(device: torch.device) -> _Kernels:
    return fused_kernels() if fused_available(device) else EAGER


def _blocks(n: int, size: int):
    return [slice(i, i + size) for i in range(0, n, size)]


def _slabs(rows: int, vocab: int, columns: int | None):
    step = columns or slab_columns(rows, vocab)
    return [(i, min(i + step, vocab)) for i in range(0, vocab, step)]


def _tile(h: torch.Tensor, w: torch.Tensor, start: int, masked_id: int | None) -> torch.Tensor:
    """Logits of rows h for the head's slab w (vocabulary rows from ``start``), in their dtype; [MASK] -inf."""
    logits = F.linear(h, w)
    if masked_id is not None and start <= masked_id < start + w.shape[0]:
        logits[:, masked_id - start] = float("-inf")
    return logits


def _target_columns(t: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's target as a column of the slab [start, stop) (clamped into it) and whether it lies inside."""
    inside = (t >= start) & (t < stop)
    return (t - start).clamp(0, stop - start - 1), inside


def linear_cross_entropy_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    groups: torch.Tensor | None = None,
    num_groups: int = 1,
    *,
    masked_id: int | None = None,
    chunk_rows: int = ROW_BLOCK,
    columns: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-group sums of CE(hidden_i @ weight.T, targets_i) for hidden [N, E], weight [V, E], targets [N] and
    ``groups`` [N] in [0, num_groups) (all 0 by default): a [num_groups] tensor in the accumulation dtype (fp32;
    fp64 for fp64 inputs). Rows go ``chunk_rows`` at a time and the vocabulary ``columns`` at a time (default:
    one tile of fp32 logits within ``CHUNK_BYTES``). One call serves several losses over the same head. Column
    ``masked_id`` of the logits is -inf; ``ignore_index`` targets are skipped. N = 0 gives zeros still in the
    graph."""
    if chunk_rows < 1 or (columns is not None and columns < 1):
        raise ValueError(f"chunk_rows and columns must be >= 1, got {chunk_rows} and {columns}")
    if groups is None:
        groups = torch.zeros_like(targets)
    if groups.shape != targets.shape:
        raise ValueError(f"groups {tuple(groups.shape)} must match targets {tuple(targets.shape)}")
    dtype = _compute_dtype(hidden, weight)
    return _LinearCrossEntropySums.apply(hidden, weight, targets, groups, num_groups, dtype, chunk_rows, columns,
                                         masked_id, ignore_index)


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    masked_id: int | None = None,
    chunk_rows: int = ROW_BLOCK,
    columns: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight.T, targets_i) as a scalar: ``linear_cross_entropy_sums`` with one group."""
    return linear_cross_entropy_sums(hidden, weight, targets, masked_id=masked_id, chunk_rows=chunk_rows,
                                     columns=columns, ignore_index=ignore_index)[0]


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
