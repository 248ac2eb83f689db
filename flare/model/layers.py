"""Small building blocks shared by the layers: RMS norms, the SwiGLU MLP and partial rotary embeddings."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flare.ops.precision import accum_dtype, cast, constant, faking


def normalize_last(h: torch.Tensor, eps: float, mean: bool = True) -> torch.Tensor:
    """h * rsqrt(eps + mean(h^2)) over the last dim (RMS), or h * rsqrt(eps + sum(h^2)) (``mean=False``: L2)."""
    # eps + |h|^2 (/ D) in one addcmul: on CPU, vector_norm costs a third of pow + mean per small call, and
    # F.rms_norm several times more (a decode step is priced in op dispatches).
    eps_t = constant(eps, h.dtype, h.device)
    n = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    return h * torch.rsqrt(torch.addcmul(eps_t, n, n, value=1.0 / h.shape[-1] if mean else 1.0))


_FROZEN = [0]  # depth of frozen_weights() contexts


@contextlib.contextmanager
def frozen_weights():
    """Inside, ``derived`` values are kept between forwards: what decoding runners enter (weights cannot change
    in the middle of a decode call). Training never does, so no sharded or in-flight update can go stale."""
    _FROZEN[0] += 1
    try:
        yield
    finally:
        _FROZEN[0] -= 1


def weights_frozen() -> bool:
    """Whether a ``frozen_weights()`` context is open."""
    return _FROZEN[0] > 0


def derived(owner: nn.Module, name: str, fn, *params: torch.Tensor, key: tuple = ()) -> torch.Tensor:
    """``fn(*params)``; inside ``frozen_weights()`` kept on ``owner`` while the parameters are unchanged (same
    storage, same version), so a decode step skips recomputing what only depends on the weights (a norm's
    1 + w, a decay rate). Where tensors are fake or traced (``faking``) it is computed, never kept."""
    if not _FROZEN[0] or faking() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        return fn(*params)
    # Asked ~200 times a decode forward (each norm and linear): one parameter's stamp is built without a generator.
    if len(params) == 1:
        stamp = (params[0].data_ptr(), params[0]._version, key)
    else:
        stamp = (tuple((p.data_ptr(), p._version) for p in params), key)
    cache = owner.__dict__.get("_derived")
    if cache is None:
        cache = owner.__dict__["_derived"] = {}
    hit = cache.get(name)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = fn(*params)
    cache[name] = (stamp, value)
    return value


def norm_scale(weight: torch.Tensor, zero_centered: bool, acc: torch.dtype) -> torch.Tensor:
    """What multiplies the normalised activations: 1 + w (zero-centred, in fp32) or w itself."""
    return 1.0 + (weight if weight.dtype == acc else weight.to(acc)) if zero_centered else weight


def scaled_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, zero_centered: bool) -> torch.Tensor:
    """RMSNorm over the last dim in fp32 with a ``norm_scale``. Zero-centred (Qwen3.5 / Qwen3-Next):
    x_hat * (1 + w), cast last; plain (Llama, Qwen3): w * x_hat cast first. The scale broadcasts against x."""
    acc = accum_dtype(x.dtype)
    # Casts only where the dtype changes: a decode step is priced in op dispatches, not arithmetic.
    h = normalize_last(x if x.dtype == acc else x.to(acc), eps)
    if zero_centered:
        out = h * scale
        return out if out.dtype == x.dtype else out.type_as(x)
    return scale * (h if h.dtype == x.dtype else h.to(x.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, zero_centered: bool) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = accum_dtype(x.dtype)
        scale = derived(self, "scale", lambda w: norm_scale(w, self.zero_centered, acc), self.weight, key=(acc,))
        return scaled_norm(x, scale, self.eps, self.zero_centered)


class GatedRMSNorm(nn.Module):
    """norm(o) * silu(z), the output norm of a Gated DeltaNet head (weight multiplies, not zero-centred)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        acc = accum_dtype(x.dtype)
        h = normalize_last(cast(x, acc), self.eps)
        h = self.weight * cast(h, x.dtype)
        return cast(h * F.silu(cast(gate, acc)), x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are one fused projection (rows gate | up)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


_ROPE: dict[tuple, torch.Tensor] = {}


@dataclass(frozen=True)
class Rotary:
    """RoPE of a forward's rows in a form applied with three ops: ``x * cos + rotate_half(x) * sin``.

    Partial RoPE rotates the first R of D dims in the rotate-half layout: over all D dims, ``cos`` is cos(angle)
    on the first R and 1 after, ``sin`` is -sin(angle) on the first R/2, +sin(angle) on the next R/2 and 0
    after; rotate_half swaps the two halves of the first R (the same values as rotating the halves), as a
    ``roll`` (index_select along the last dim is unvectorised on the CPU: 77 vs 8 us for an AR-Trust round's
    [8, 9, 12, 64] bf16 q|k). cos and sin are [B, T, 1, D], or [1, T, 1, D] when every sequence is at the same
    positions."""

    cos: torch.Tensor
    sin: torch.Tensor
    rotary_dim: int

    def apply(self, x_BTHD: torch.Tensor) -> torch.Tensor:
        R = self.rotary_dim
        if R == x_BTHD.shape[-1]:
            rotated = x_BTHD.roll(R // 2, -1)
        else:  # the dims past R stay in place (sin is 0 there)
            rotated = torch.cat([x_BTHD[..., :R].roll(R // 2, -1), x_BTHD[..., R:]], -1)
        return torch.addcmul(x_BTHD * self.cos, rotated, self.sin)


def rotary(
    positions: torch.Tensor | range, rotary_dim: int, head_dim: int, theta: float, dtype: torch.dtype,
    device: torch.device | str, limit: int,
) -> Rotary:
    """RoPE of integer positions: a [B, T] tensor, or a ``range`` shared by every sequence. ``limit`` is a
    host-side bound (every position < limit). Values come from a per-(R, D, theta, dtype, device) table grown by
    doubling: a decode step reads its rows instead of recomputing them (the same arithmetic as direct)."""
    device = torch.device(device)
    key = (rotary_dim, head_dim, theta, dtype, device)
    table = _ROPE.get(key)
    if faking():
        # A dry run on fake tensors (flare train --dry-run): its table must not outlive it in the cache.
        table = _rotary_table(max(limit, 1), rotary_dim, head_dim, theta, dtype, device)
    elif table is None or table.shape[0] < limit:
        n = max(256, 1 << max(limit - 1, 0).bit_length())
        with torch.inference_mode(False):  # kept for training too, whose autograd refuses inference tensors
            table = _ROPE[key] = _rotary_table(n, rotary_dim, head_dim, theta, dtype, device)
    rows = table[positions.start:positions.stop][None] if isinstance(positions, range) else table[positions]
    cos, sin = rows.unbind(-3)
    return Rotary(cos, sin, rotary_dim)


def _rotary_table(n: int, rotary_dim: int, head_dim: int, theta: float, dtype: torch.dtype, device):
    """[n, 2, 1, D] cos | signed sin of positions 0..n-1, computed in the accumulation dtype, then cast."""
    acc, R = accum_dtype(dtype), rotary_dim
    steps = torch.arange(0, R, 2, device=device).to(acc)
    inv_freq = 1.0 / (theta ** (steps / R))
    freqs = torch.arange(n, device=device).to(acc)[:, None] * inv_freq  # [n, R/2]
    cos, sin = freqs.cos(), freqs.sin()
    ones, zeros = cos.new_ones(n, head_dim - R), cos.new_zeros(n, head_dim - R)
    full_cos = torch.cat((cos, cos, ones), dim=-1)
    full_sin = torch.cat((-sin, sin, zeros), dim=-1)
    return torch.stack((cast(full_cos, dtype), cast(full_sin, dtype)), dim=1)[:, :, None, :]
