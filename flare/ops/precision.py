"""The accumulation dtype of the numerically sensitive ops (norms, decays, recurrences)."""

from __future__ import annotations

import torch


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every training/serving dtype; fp64 stays fp64, so a float64 model is float64 end to end and
    exactness tests can separate logic errors from round-off."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` without the dispatch when nothing changes (decode steps are priced in dispatches)."""
    return x if x.dtype == dtype else x.to(dtype)


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def constant(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A kept 0-d tensor of ``value``: multiplying by it is a plain tensor op, where a Python float is first
    wrapped into a new tensor on every call (three times the cost of the op itself on a small CPU tensor)."""
    key = (value, dtype, device)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS.setdefault(key, torch.tensor(value, dtype=dtype, device=device))
    return t
