"""Depthwise causal conv1d over time with an explicit carried state (the Gated DeltaNet short conv)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flare.ops.precision import accum_dtype, cast
from flare.ops.take import take_rows

# From this many channels the K-tap window sum runs as K fused multiply-adds over [B, T, C] slices, accumulated in
# fp32, instead of one product over the [B, T, K, C] windows and a sum: on the 6,144 channels of a Qwen3.5-0.8B
# layer in bf16 (AMX Xeon, 2 threads) 0.56 vs 1.33 ms for 8 sequences x 7 rows, 0.03 vs 0.18 ms for one row;
# below it (toy models) the two-op form dispatches less (6 vs 16 us at 192 channels). The inputs are cast to fp32
# once, before the windows are cut: a multiply-add that converts a bf16 operand converts it into a temporary
# first, one more pass per tap (a verify forward of 8 x 7 rows: 13.1 -> 10.9 ms over 18 layers; the same values).
LOOP_MIN_CHANNELS = 1024
# Forwards that need no gradient (decoding, prefills included) always take the window sum; training's longer rows
# take F.conv1d above this many. oneDNN's depthwise conv wants [B, C, T]: a transposing copy in, and an output
# whose channels lie T apart, which every op after it reads slowly (the q/k norm of a 512-token prefill of a
# Qwen3.5-0.8B-shaped layer: 8.6 ms; AMX Xeon, 2 threads). Conv and the norm after it, conv path -> window sum:
# 15.2 -> 4.2 ms (1 x 512 tokens, 6,144 channels, bf16), 3.6 -> 2.2 (8 x 32), 77.5 -> 27.4 (1 x 2,000); toy
# sizes (192 channels, fp32) 0.67 -> 0.24 ms (1 x 512), 0.28 -> 0.14 (8 x 30). The same values in bf16.
WINDOW_MAX_T = 16


def _loop_form(x: torch.Tensor, weight_CK: torch.Tensor) -> torch.Tensor:
    """``x`` [B, L, C] as the window sum takes it: in the accumulation dtype where the multiply-add loop runs."""
    return cast(x, accum_dtype(weight_CK.dtype)) if x.shape[-1] >= LOOP_MIN_CHANNELS else x


def _window_sum(windows_BTKC: torch.Tensor, weight_CK: torch.Tensor) -> torch.Tensor:
    """sum_j w[:, j] * windows[:, :, j] (oldest tap first): [B, T, C]."""
    if windows_BTKC.shape[-1] < LOOP_MIN_CHANNELS:
        return (windows_BTKC * weight_CK.t()).sum(2)
    w = cast(weight_CK, accum_dtype(weight_CK.dtype)).t().contiguous()  # [K, C]: each tap read contiguously
    y = cast(windows_BTKC[:, :, 0], w.dtype) * w[0]
    for j in range(1, w.shape[0]):
        y.addcmul_(windows_BTKC[:, :, j], w[j])
    return y


def conv_inputs(x_BTC: torch.Tensor, state_BkC: torch.Tensor | None, K: int) -> torch.Tensor:
    """[state ; x] [B, K-1+T, C] in x's dtype (zeros for a missing state): every input a row's window reads."""
    if state_BkC is None:
        return torch.cat([x_BTC.new_zeros(x_BTC.shape[0], K - 1, x_BTC.shape[2]), x_BTC], dim=1)
    return torch.cat([cast(state_BkC, x_BTC.dtype), x_BTC], dim=1)


def causal_conv1d(
    x_BTC: torch.Tensor,
    weight_CK: torch.Tensor,
    state_BkC: torch.Tensor | None = None,
    lengths_B: torch.Tensor | None = None,
    *,
    full: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = sum_j w[:, j] * x_{t-K+1+j}, with the K-1 inputs before x_0 taken from ``state`` (zeros when None).

    Returns (y [B, T, C] before any activation, new_state [B, K-1, C]). The new state holds the K-1 inputs that
    end at position ``lengths[b]`` of row b (all T when None), so right-padded rows carry the right state.
    ``full``: ``conv_inputs(x, state)``, when the caller has it already.
    """
    B, T, C = x_BTC.shape
    K = weight_CK.shape[1]
    full = cast(conv_inputs(x_BTC, state_BkC, K) if full is None else full, weight_CK.dtype)  # [B, K-1+T, C]
    if T <= WINDOW_MAX_T or not (torch.is_grad_enabled() and (x_BTC.requires_grad or weight_CK.requires_grad)):
        # Decode steps, verify blocks and prefills: a weighted sum over the K-window, in [B, T, C] throughout.
        y = _window_sum(_loop_form(full, weight_CK).unfold(1, K, 1).transpose(-1, -2), weight_CK)  # [B, T, C]
    else:
        y = F.conv1d(full.transpose(1, 2), weight_CK[:, None, :], groups=C).transpose(1, 2)
    if lengths_B is None:
        # Its own tensor with its own strides, not a view of ``full`` (whose strides differ with T, even at one
        # sequence, where .contiguous() keeps the view): a compiled step guards on
        # the cache's strides and would recompile (flare.engine.compiled).
        new_state = full[:, T:].clone(memory_format=torch.contiguous_format)
    else:
        new_state = take_rows(full, lengths_B[:, None] + torch.arange(K - 1, device=x_BTC.device))
    return cast(y, x_BTC.dtype), cast(new_state, x_BTC.dtype)


def tree_windows(parent_BT: torch.Tensor, K: int) -> torch.Tensor:
    """Row t's conv window over rows that form a tree (``flare.model.row_tree``) [B, T, K], oldest first, as
    indices into ``[carried state (K-1) ; rows (T)]``: the K-1 rows on its own path before it (``parent``
    pointers; -1 continues into the carried state) and itself. Depends on the layout only."""
    B, T = parent_BT.shape
    K1 = K - 1
    carried = torch.arange(-1, K1 - 1, device=parent_BT.device).expand(B, K1)
    up = torch.cat([carried, torch.where(parent_BT >= 0, parent_BT + K1, K1 - 1)], dim=1)  # [B, K-1+T]
    at = torch.arange(K1, K1 + T, device=parent_BT.device).expand(B, T)
    window = [at]
    for _ in range(K1):
        at = up.gather(1, at)
        window.append(at)
    return torch.stack(window[::-1], dim=-1)


def tree_conv1d(x_BTC: torch.Tensor, weight_CK: torch.Tensor, state_BkC: torch.Tensor,
                parent_BT: torch.Tensor | None = None, windows: torch.Tensor | None = None, *,
                full: torch.Tensor | None = None) -> torch.Tensor:
    """``causal_conv1d`` over rows that form a tree (``flare.model.row_tree``): row t's window is the K-1 rows
    on its own path before it (``parent`` pointers; -1 continues into the carried ``state``) and itself; pass
    ``windows`` (``tree_windows(parent, K)``) instead of ``parent`` where it is already built, and ``full``
    (``conv_inputs(x, state)``) where that is.
    Returns y [B, T, C] before any activation; the carried state is not advanced (read-only rows)."""
    K = weight_CK.shape[1]
    full = conv_inputs(x_BTC, state_BkC, K) if full is None else full
    full = _loop_form(cast(full, weight_CK.dtype), weight_CK)  # [B, K-1+T, C]
    idx = tree_windows(parent_BT, K) if windows is None else windows
    return cast(_window_sum(take_rows(full, idx), weight_CK), x_BTC.dtype)
