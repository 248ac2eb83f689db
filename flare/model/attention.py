"""Softmax attention layer: GQA, optional q/k RMSNorm, partial RoPE, optional sigmoid output gate (Qwen3.5)."""

from __future__ import annotations

import torch
from torch import nn

from flare.config import ModelConfig
from flare.model.context import ForwardContext
from flare.model.layers import RMSNorm, apply_rotary
from flare.ops.attention import attention


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.gated = config.attn_output_gate
        hidden, q_out = config.hidden_size, self.num_heads * self.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden, q_out * (2 if self.gated else 1), bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(q_out, hidden, bias=bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_zero_centered)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_zero_centered)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x_BTE: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x_BTE.shape
        D = self.head_dim
        q = self.q_proj(x_BTE)
        gate = None
        if self.gated:
            q, gate = q.view(B, T, self.num_heads, 2 * D).chunk(2, dim=-1)
            gate = gate.reshape(B, T, self.num_heads * D)
        q = q.reshape(B, T, self.num_heads, D)
        k = self.k_proj(x_BTE).view(B, T, self.num_kv_heads, D)
        v = self.v_proj(x_BTE).view(B, T, self.num_kv_heads, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.write_kv(self.layer_idx, k, v, ctx.write_pos)
        out = attention(q, k, v, ctx.attn_mask, D**-0.5).reshape(B, T, self.num_heads * D)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)
