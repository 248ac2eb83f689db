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
