"""Gated DeltaNet layer: fused q/k/v projection, short causal conv + SiLU, gated delta recurrence, gated norm.

The four input projections of the Qwen3.5 layout (``in_proj_qkv | in_proj_z | in_proj_b | in_proj_a``) are one
fused GEMM here (``in_proj``); the checkpoint key map splits and joins them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from flare.config import ModelConfig
from flare.model.cache import RecurrentState
from flare.model.context import ForwardContext
from flare.model.layers import GatedRMSNorm
from flare.ops.conv import causal_conv1d
from flare.ops.gated_delta import gated_delta
from flare.ops.precision import accum_dtype

log = logging.getLogger(__name__)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x = x.to(accum_dtype(x.dtype))
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.dk = config.linear_key_head_dim
        self.dv = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.dk
        self.value_dim = self.num_v_heads * self.dv
        hidden, kernel = config.hidden_size, config.linear_conv_kernel_dim
        conv_dim = 2 * self.key_dim + self.value_dim
        self.split = [conv_dim, self.value_dim, self.num_v_heads, self.num_v_heads]
        self.in_proj = nn.Linear(hidden, sum(self.split), bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel, groups=conv_dim, bias=False, padding=kernel - 1)
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.norm = GatedRMSNorm(self.dv, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, hidden, bias=False)
        # Which recurrence form ran last ("naive" or "chunk"): reported, never silent.
        self.last_path = ""

    def forward(self, x_BTE: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x_BTE.shape
        state = ctx.cache.layers[self.layer_idx] if ctx.cache is not None else None
        assert state is None or isinstance(state, RecurrentState)

        qkv, z, b, a = self.in_proj(x_BTE).split(self.split, dim=-1)
        mixed, conv_state = causal_conv1d(qkv, self.conv1d.weight[:, 0, :], state.conv if state else None, ctx.n_new)
        mixed = F.silu(mixed)
        qk, v = mixed.split([2 * self.key_dim, self.value_dim], dim=-1)
        q, k = l2_normalize(qk.reshape(B, T, 2 * self.num_k_heads, self.dk)).chunk(2, dim=2)
        v = v.reshape(B, T, self.num_v_heads, self.dv)
        acc = accum_dtype(x_BTE.dtype)
        beta = torch.sigmoid(b).to(acc)
        g = -self.A_log.to(acc).exp() * F.softplus(a.to(acc) + self.dt_bias)
        if ctx.valid is not None:
            # Padding rows leave the state untouched: decay exp(0) = 1 and write strength 0.
            g = g * ctx.valid[..., None]
            beta = beta * ctx.valid[..., None]

        o, final, path = gated_delta(q, k, v, g, beta, initial_state=state.ssm if state else None)
        self.last_path = path
        if state is not None:
            state.conv, state.ssm = conv_state, final

        z = z.reshape(B, T, self.num_v_heads, self.dv)
        o = self.norm(o.to(x_BTE.dtype), z).reshape(B, T, self.value_dim)
        return self.out_proj(o)
