"""Small building blocks shared by the layers: RMS norms, the SwiGLU MLP and partial rotary embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flare.ops.precision import accum_dtype


class RMSNorm(nn.Module):
    """RMSNorm in fp32. Zero-centred (Qwen3.5 / Qwen3-Next): x_hat * (1 + w); plain (Llama, Qwen3): w * x_hat."""

    def __init__(self, dim: int, eps: float, zero_centered: bool) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(accum_dtype(x.dtype))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (h * (1.0 + self.weight.to(h.dtype))).type_as(x)
        return self.weight * h.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """norm(o) * silu(z), the output norm of a Gated DeltaNet head (weight multiplies, not zero-centred)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        acc = accum_dtype(x.dtype)
        h = x.to(acc)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(x.dtype)
        return (h * F.silu(gate.to(acc))).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotary_cos_sin(
    positions_BT: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, T, rotary_dim] for integer positions, in the rotate-half layout."""
    acc = accum_dtype(dtype)
    steps = torch.arange(0, rotary_dim, 2, device=positions_BT.device).to(acc)
    inv_freq = 1.0 / (theta ** (steps / rotary_dim))
    freqs = positions_BT.to(acc)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x_BTHD: torch.Tensor, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of each head (partial RoPE); the rest pass through."""
    r = cos_BTR.shape[-1]
    cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    x_rot, x_pass = x_BTHD[..., :r], x_BTHD[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)
