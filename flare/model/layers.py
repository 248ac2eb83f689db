"""Small building blocks shared by the layers: RMS norms, the SwiGLU MLP and partial rotary embeddings."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from flare.ops.precision import accum_dtype, cast


_EPS: dict[tuple, torch.Tensor] = {}


def _normalize(h: torch.Tensor, eps: float) -> torch.Tensor:
    # mean(h^2) + eps as eps + |h|^2 / D in one addcmul: on CPU, vector_norm costs a third of pow + mean per
    # small call, and F.rms_norm several times more (a decode step is priced in op dispatches).
    key = (eps, h.dtype, h.device)
    eps_t = _EPS.get(key)
    if eps_t is None:
        eps_t = _EPS.setdefault(key, torch.tensor(eps, dtype=h.dtype, device=h.device))
    n = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    return h * torch.rsqrt(torch.addcmul(eps_t, n, n, value=1.0 / h.shape[-1]))


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


def derived(owner: nn.Module, name: str, fn, *params: torch.Tensor, key: tuple = ()) -> torch.Tensor:
    """``fn(*params)``; inside ``frozen_weights()`` kept on ``owner`` while the parameters are unchanged (same
    storage, same version), so a decode step skips recomputing what only depends on the weights (a norm's
    1 + w, a decay rate)."""
    if not _FROZEN[0] or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        return fn(*params)
    stamp = (*((p.data_ptr(), p._version) for p in params), *key)
    cache = owner.__dict__.setdefault("_derived", {})
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
    h = _normalize(x if x.dtype == acc else x.to(acc), eps)
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
        h = _normalize(cast(x, acc), self.eps)
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


def rotary_cos_sin(
    positions_BT: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, T, 1, rotary_dim] (broadcast over heads) for integer positions, rotate-half layout."""
    acc = accum_dtype(dtype)
    inv_freq = _inverse_frequencies(rotary_dim, theta, positions_BT.device, acc)
    freqs = positions_BT.to(acc)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return cast(emb.cos(), dtype), cast(emb.sin(), dtype)


@functools.lru_cache(maxsize=16)
def _inverse_frequencies(rotary_dim: int, theta: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    steps = torch.arange(0, rotary_dim, 2, device=device).to(dtype)
    return 1.0 / (theta ** (steps / rotary_dim))


def apply_rotary(x_BTHD: torch.Tensor, cos_BT1R: torch.Tensor, sin_BT1R: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of each head (partial RoPE); the rest pass through."""
    r = cos_BT1R.shape[-1]
    x_rot = x_BTHD[..., :r]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = x_rot * cos_BT1R + rotated * sin_BT1R
    return out if r == x_BTHD.shape[-1] else torch.cat((out, x_BTHD[..., r:]), dim=-1)
