"""Softmax attention layer: GQA, optional q/k RMSNorm, partial RoPE, optional sigmoid output gate (Qwen3.5)."""

from __future__ import annotations

import torch
from torch import nn

from flare.config import ModelConfig
from flare.model.context import ForwardContext, StreamMasks
from flare.model.layers import RMSNorm, derived, norm_scale, scaled_norm
from flare.ops.attention import FOLDED, SDPA, attention, attention_path, span_attention
from flare.ops.precision import accum_dtype


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
        self.q_rows = q_out * (2 if self.gated else 1)
        self.kv_rows = self.num_kv_heads * self.head_dim
        # One GEMM for q (with its gate), k and v: rows q | k | v, as the checkpoint key map fuses them.
        self.qkv_proj = nn.Linear(hidden, self.q_rows + 2 * self.kv_rows, bias=bias)
        self.o_proj = nn.Linear(q_out, hidden, bias=bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_zero_centered)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_zero_centered)
        else:
            self.q_norm = self.k_norm = None
        self.last_path = ""  # the kernel path of the last forward (flare.ops.attention.attention_path)

    def forward(self, x_BTE: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x_BTE.shape
        D = self.head_dim
        q, k, v = self.qkv_proj(x_BTE).split([self.q_rows, self.kv_rows, self.kv_rows], dim=-1)
        gate = None
        if self.gated:
            q, gate = q.view(B, T, self.num_heads, 2 * D).chunk(2, dim=-1)
            gate = gate.reshape(B, T, self.num_heads * D)
        # q and k heads side by side: one norm and one rotation for both.
        qk = torch.cat([q.reshape(B, T, self.num_heads, D), k.reshape(B, T, self.num_kv_heads, D)], dim=2)
        v = v.reshape(B, T, self.num_kv_heads, D)
        if self.q_norm is not None:
            zc, acc = self.q_norm.zero_centered, accum_dtype(qk.dtype)
            scale = derived(self, "qk_scale", lambda wq, wk: norm_scale(
                torch.cat([wq.expand(self.num_heads, D), wk.expand(self.num_kv_heads, D)]), zc, acc),
                self.q_norm.weight, self.k_norm.weight, key=(acc,))
            qk = scaled_norm(qk, scale, self.q_norm.eps, zc)
        q, k = ctx.rope.apply(qk).split([self.num_heads, self.num_kv_heads], dim=2)
        if ctx.cache is not None:
            # Rows forwards put their keys in the scratch slots past each sequence's length: the committed
            # slots stay untouched, and nothing is copied.
            k, v = ctx.cache.write_kv(self.layer_idx, k, v, ctx.write_pos)
        if isinstance(ctx.attn_mask, StreamMasks):
            self.last_path = SDPA
            out = _per_stream(q, k, v, ctx.attn_mask, D**-0.5).reshape(B, T, self.num_heads * D)
        else:
            mask = ctx.attn_mask
            self.last_path = attention_path(q, k, mask)
            if self.last_path == FOLDED and isinstance(mask, torch.Tensor) and not torch.compiler.is_compiling():
                mask = ctx.folded_mask(self.num_heads // self.num_kv_heads, q.dtype)  # once for every layer
            out = (attention(q, k, v, mask, D**-0.5) if ctx.span is None
                   else span_attention(q, k, v, mask, ctx.span, D**-0.5)).reshape(B, T, self.num_heads * D)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)


def _per_stream(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: StreamMasks, scale: float) -> torch.Tensor:
    """Two-stream attention one stream at a time, each over the keys its mask can let through."""
    L = m.L
    outs = [attention(q[:, :L], k[:, :L], v[:, :L], m.clean, scale)]
    for span, mask in zip(m.spans, m.noisy):
        rows = slice(span.start, span.stop)
        keys, vals = torch.cat([k[:, :L], k[:, rows]], 1), torch.cat([v[:, :L], v[:, rows]], 1)
        outs.append(attention(q[:, rows], keys, vals, mask, scale))
    return torch.cat(outs, 1)
