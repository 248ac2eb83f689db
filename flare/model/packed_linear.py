"""Linears with their weights prepacked once for oneDNN, for decoding on the CPU (bf16 and fp32).

``F.linear`` on bf16 CPU tensors reorders the weight into oneDNN's blocked layout on every call, and on fp32 it
runs MKL's GEMM, whose few-row cases are slow on some CPUs; a decoding step calls each linear once with a few
rows. ``prepack(model)`` reorders each weight once and routes each ``nn.Linear`` of the model through
``torch.ops.mkldnn._linear_pointwise`` on the packed copy. bf16: the same oneDNN kernel on the same operands, so
the outputs are bit-identical to ``F.linear``'s (tested), and faster (``benchmarks/bench_linear_paths.py``: the
decoder linears of SmolLM2-135M, AMX Xeon, 2 threads, 0.72x ``F.linear`` bf16 at 1 to 9 rows). fp32: another
kernel than MKL's, equal to ``F.linear`` to fp32 rounding (tested), and on an AVX2-only EPYC 0.60x its time at
1 row and 0.55x at 9 (the same weights). A oneDNN call costs ~18 us of fixed overhead against ~3 us for
``F.linear``, so an fp32 weight is packed only from ``flare.device.FP32_MIN_NUMEL`` elements (the measured break-even).
A smaller fp32 weight runs ``F.linear`` on a column-major copy (the contiguous [in, out] transpose, viewed as the
weight): MKL then multiplies by a row-major right operand, which it reads faster than the transposed one a
row-major weight gives it, most of all where the weight comes cold from memory, as in decoding, where a whole
forward runs between two uses of it (``benchmarks/bench_linear_paths.py``, AVX-512-BF16 EPYC, one thread, the demo
model's 16 decoder weights at 1 / 7 / 56 rows: 0.13 / 0.32 / 1.09 ms against 0.15 / 0.34 / 1.09 in a loop,
0.40 / 0.52 / 1.38 against 0.43 / 0.84 / 1.63 with ``--idle-ms 3``; decodes of the demo checkpoint, old and new
alternated 12-30 times, paired medians: causal 0.93-0.98x the time, AR-Trust 0.94-1.00x, the same tokens).
Equal to ``F.linear`` to fp32 rounding (tested).

The packed copy is a ``derived`` value (``flare.model.layers``): kept while the weight is unchanged (same
storage, same version) inside ``frozen_weights()``, which the decoding runners enter; outside it, with
gradients wanted, for another dtype or device, or under ``torch.compile`` (inductor packs frozen weights
itself), the linear is plain ``F.linear``. The copy is extra memory: the size of the packed and column-major linears'
weights again (the tied LM head included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flare.device import column_major, packs
from flare.model.layers import derived, weights_frozen
from flare.ops.precision import faking

PLAIN = "aten"
COLUMN_MAJOR = "aten-column-major-fp32"
PACKABLE = (torch.bfloat16, torch.float32)


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` with a oneDNN-packed copy of its weight (same parameters, same state dict)."""

    def __getstate__(self) -> dict:
        # A copy or a pickle leaves the packed copy behind (oneDNN's opaque tensors have no storage to copy);
        # it is made again on first use.
        state = self.__dict__.copy()
        state.pop("_derived", None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step calls each linear once with a few rows: the checks read the parameters dict directly and
        # ask the cheap questions first (nn.Module's attribute lookup and the device checks of ``packs``, asked
        # only when the packed copy is made, were ~12 us of a 21 us call on SmolLM2's 576 x 576 bf16 weight).
        params = self._parameters
        w, b = params["weight"], params["bias"]
        if (not weights_frozen() or x.dtype != w.dtype or (b is not None and b.dtype != w.dtype)
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)) or faking()):
            return F.linear(x, w, b)
        return packed_linear(x, w, b, derived(self, "packed", pack, w))


def packed_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                  packed: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, b)``, through ``packed`` (``pack(w)``, same dtype as ``x``) where there is one."""
    if packed is None:
        return F.linear(x, w, b)
    if not packed.is_mkldnn:  # a column-major copy
        return F.linear(x, packed, b)
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def pack(w: torch.Tensor) -> torch.Tensor | None:
    """The oneDNN-packed copy of ``w`` (``flare.device.packs``), a column-major copy of a small fp32 weight
    (``flare.device.column_major``), or None."""
    if packs(w):
        return torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
    return w.detach().t().contiguous().t() if column_major(w) else None


def prepack(model: nn.Module) -> int:
    """Route every ``nn.Linear`` of ``model`` through a packed copy of its weight (packed on first use); returns
    how many linears are packed. Idempotent; the model's parameters and state dict are untouched."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear
        count += isinstance(module, PackedLinear)
    return count


def packed_path(dtype: torch.dtype) -> str:
    """The name of the packed path for ``dtype``: ``onednn-packed-bf16`` or ``onednn-packed-fp32``."""
    return "onednn-packed-" + {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def linear_path(model: nn.Module) -> str:
    """``onednn-packed-bf16`` / ``-fp32`` when ``model``'s linears run packed (``prepack``, on the CPU),
    ``aten-column-major-fp32`` when its fp32 linears are all too small to pack and run on column-major copies, else
    ``aten``."""
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    p = next((m for m in linears if packs(m.weight)), None)
    if p is not None:
        return packed_path(p.weight.dtype)
    return COLUMN_MAJOR if any(column_major(m.weight) for m in linears) else PLAIN
