"""Linears with their weights prepacked once for oneDNN, for bf16 decoding on the CPU.

``F.linear`` on bf16 CPU tensors reorders the weight into oneDNN's blocked layout on every call; a decoding step
calls each linear once with a few rows, so that reorder is a large part of the step. ``prepack(model)`` does it
once per weight and routes each ``nn.Linear`` of the model through ``torch.ops.mkldnn._linear_pointwise`` on the
packed copy: the same oneDNN kernel on the same bf16 operands, so the outputs are bit-identical to ``F.linear``'s
(tested), and faster (``benchmarks/bench_linear_paths.py``: the decoder linears of SmolLM2-135M, AMX Xeon, 2
threads, 0.72x ``F.linear`` bf16 at 1 to 9 rows).

A packed linear falls back to ``F.linear`` whenever the packed copy does not apply: gradients wanted, another
dtype or device than the packed one, or an input of another dtype. It repacks when its weight was changed in place
(an optimizer step, ``load_state_dict``) or replaced. The packed copy is extra memory: the size of the linears'
bf16 weights again (the tied LM head included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


PACKED, PLAIN = "onednn-packed-bf16", "aten"


def available() -> bool:
    """Whether this torch build has oneDNN's packed linear (the caller decides whether bf16 pays here:
    ``flare.device.pack_linears``)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` with a oneDNN-packed copy of its weight (same parameters, same state dict)."""

    _packed: torch.Tensor | None = None
    _packed_from: tuple = (None, 0, None)  # (the weight, its data_ptr, its version; None: an inference tensor)

    def __getstate__(self) -> dict:
        # A copy or a pickle leaves the packed copy behind (oneDNN's opaque tensors have no storage to copy);
        # it is made again on first use.
        state = self.__dict__.copy()
        state.pop("_packed", None)
        state.pop("_packed_from", None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # The decoding path first, in as few checks as a step can afford (a step calls ~100 linears): the packed
        # copy is of this very weight, unchanged since (same storage; same version, where it has one).
        pw, ptr, version = self._packed_from
        fresh = w is pw and w.data_ptr() == ptr and (version is None or w._version == version)
        if fresh and x.dtype is torch.bfloat16 and not torch.is_grad_enabled():
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        if (w.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or w.device.type != "cpu"
                or (self.bias is not None and self.bias.dtype != torch.bfloat16)
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            return F.linear(x, w, self.bias)
        if not fresh:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            # Inference tensors (made under torch.inference_mode) keep no version counter and cannot change in
            # place.
            self._packed_from = (w, w.data_ptr(), None if w.is_inference() else w._version)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


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
