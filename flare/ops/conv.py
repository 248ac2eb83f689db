"""Depthwise causal conv1d over time with an explicit carried state (the Gated DeltaNet short conv)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x_BTC: torch.Tensor,
    weight_CK: torch.Tensor,
    state_BCk: torch.Tensor | None = None,
    lengths_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = sum_j w[:, j] * x_{t-K+1+j}, with the K-1 inputs before x_0 taken from ``state`` (zeros when None).

    Returns (y [B, T, C] before any activation, new_state [B, C, K-1]). The new state holds the K-1 inputs that
    end at position ``lengths[b]`` of row b (all T when None), so right-padded rows carry the right state.
    """
    B, T, C = x_BTC.shape
    K = weight_CK.shape[1]
    xt = x_BTC.transpose(1, 2).to(weight_CK.dtype)
    prev = state_BCk.to(weight_CK.dtype) if state_BCk is not None else xt.new_zeros(B, C, K - 1)
    full = torch.cat([prev, xt], dim=2)  # [B, C, K-1+T]
    y = F.conv1d(full, weight_CK[:, None, :], groups=C)  # [B, C, T]
    if lengths_B is None:
        new_state = full[:, :, T:]
    else:
        idx = lengths_B[:, None] + torch.arange(K - 1, device=x_BTC.device)
        new_state = full.gather(2, idx[:, None, :].expand(B, C, K - 1))
    return y.transpose(1, 2).to(x_BTC.dtype), new_state.to(x_BTC.dtype)
