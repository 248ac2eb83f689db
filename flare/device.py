"""Which torch device a front door runs on: the one asked for when it exists, else the one that does."""

from __future__ import annotations

import warnings

import torch


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """None: CUDA when available, else the CPU. A CUDA device asked for on a machine without CUDA (lm-eval's
    command line asks for one by default) runs on the CPU instead, with a warning that says so."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"device {str(requested)!r} was asked for but this machine has no CUDA device: running on "
                      "the CPU", stacklevel=2)
        return torch.device("cpu")
    return device
