"""Linears with their weights prepacked once for oneDNN, for bf16 decoding on the CPU.

``F.linear`` on bf16 CPU tensors reorders the weight into oneDNN's blocked layout on every call; a decoding step
calls each linear once with a few rows, so that reorder is a large part of the step. ``prepack(model)`` does it
once per weight and routes each ``nn.Linear`` of the model through ``torch.ops.mkldnn._linear_pointwise`` on the
packed copy: the same oneDNN kernel on the same bf16 operands, so the outputs are bit-identical to ``F.linear``'s
(tested), and faster (``benchmarks/bench_linear_paths.py``: the decoder linears of SmolLM2-135M, AMX Xeon, 2
threads, 0.72x ``F.linear`` bf16 at 1 to 9 rows).

The packed copy is a ``derived`` value (``flare.model.layers``): kept while the weight is unchanged (same
storage, same version) inside ``frozen_weights()``, which the decoding runners enter; outside it, with
gradients wanted, or for another dtype or device, the linear is plain ``F.linear``. The packed copy is extra
memory: the size of the linears' bf16 weights again (the tied LM head included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flare.model.layers import derived, weights_frozen

PACKED, PLAIN = "onednn-packed-bf16", "aten"


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` with a oneDNN-packed copy of its weight (same parameters, same state dict)."""

    def __getstate__(self) -> dict:
        # A copy or a pickle leaves the packed copy behind (oneDNN's opaque tensors have no storage to copy);
        # it is made again on first use.
        state = self.__dict__.copy()
        state.pop("_derived", None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if (not weights_frozen() or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or w.device.type != "cpu"
                or (b is not None and b.dtype != torch.bfloat16)
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            return F.linear(x, w, b)
        packed = derived(self, "packed", lambda w_: torch.ops.mkldnn._reorder_linear_weight(w_.detach(), None), w)
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def prepack(model: nn.Module) -> int:
    """Route every ``nn.Linear`` of ``model`` through a packed copy of its weight (packed on first use); returns
    how many linears are packed. Idempotent; the model's parameters and state dict are untouched."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear
        count += isinstance(module, PackedLinear)
    return count


def linear_path(model: nn.Module) -> str:
    """``onednn-packed-bf16`` when ``model``'s linears run packed (``prepack``, bf16 on the CPU), else ``aten``."""
    p = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if isinstance(p, PackedLinear) and p.weight.dtype == torch.bfloat16 and p.weight.device.type == "cpu":
        return PACKED
    return PLAIN
