"""Writes into a decoding cache's tensors: in place where the tensor must stay where it is (a CUDA graph reads
the cache's tensors by address, ``flare.engine.graphed``; a compiled forward writes in place,
``flare.engine.compiled``), as a new tensor where an inference tensor is written outside inference mode."""

from __future__ import annotations

import torch

from flare.ops.precision import cast


def written(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` written into the cache's tensor ``x`` (kept where it is: a CUDA graph of a forward reads the cache's
    tensors by address, ``flare.engine.graphed``), or ``value`` as ``x``'s dtype where ``x`` is an inference tensor
    outside inference mode (a compiled forward writes in place: ``flare.engine.compiled``)."""
    if not torch.compiler.is_compiling() and x.is_inference() and not torch.is_inference_mode_enabled():
        return cast(value, x.dtype)
    return x.copy_(value)


def emptied(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x`` with ``rows`` (dim 0) zeroed: in place unless ``x`` is an inference tensor outside inference mode."""
    if x.is_inference() and not torch.is_inference_mode_enabled():
        return x.index_fill(0, rows, 0)
    return x.index_fill_(0, rows, 0)
