"""Gated DeltaNet layer: fused input projection, short causal conv + SiLU, gated delta recurrence, gated norm.

The four input projections of the Qwen3.5 layout (``in_proj_qkv | in_proj_z | in_proj_b | in_proj_a``) are one
fused GEMM here (``in_proj``); the checkpoint key map splits and joins them.

A recurrence cannot be masked, so the layouts of ``ForwardContext`` are served by scheduling states (method
§2.2): packed documents run as separate segments from zero state; in the two-stream layout each noisy block
starts from the clean state before it and every row reads the block-end state; inference rows do the same
against the cache's state without writing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flare.config import ModelConfig
from flare.model.cache import RecurrentState
from flare.model.writes import written
from flare.model.context import ForwardContext
from flare.model.layers import GatedRMSNorm, derived, normalize_last
from flare.ops.conv import causal_conv1d, conv_inputs, tree_conv1d
from flare.ops.gated_delta import gated_delta, gated_delta_rows, gated_delta_two_stream
from flare.ops.precision import accum_dtype, cast


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return normalize_last(cast(x, accum_dtype(x.dtype)), eps, mean=False)


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
        # Which recurrence form ran last ("step", "naive", "chunk", "fla", "rows", "two_stream"): reported, never
        # silent.
        self.last_path = ""

    # ------------------------------------------------------------------------------------------------ pieces
    def _conv(self, qkv: torch.Tensor, state: torch.Tensor | None, lengths: torch.Tensor | None = None,
              full: torch.Tensor | None = None):
        y, new_state = causal_conv1d(qkv, self.conv1d.weight[:, 0, :], state, lengths, full=full)
        return F.silu(y), new_state

    def _qkv(self, mixed: torch.Tensor):
        """Post-conv channels [..., T, C] -> q, k [..., T, Hk, Dk] (L2-normalised) and v [..., T, H, Dv]."""
        lead = mixed.shape[:-1]
        qk, v = mixed.split([2 * self.key_dim, self.value_dim], dim=-1)
        q, k = l2_normalize(qk.reshape(*lead, 2 * self.num_k_heads, self.dk)).chunk(2, dim=-2)
        return q, k, v.reshape(*lead, self.num_v_heads, self.dv)

    def _gates(self, b: torch.Tensor, a: torch.Tensor, valid: torch.Tensor | None):
        acc = accum_dtype(b.dtype)
        beta = cast(torch.sigmoid(b), acc)
        decay_rate = derived(self, "decay_rate", lambda a_log: -cast(a_log, acc).exp(), self.A_log, key=(acc,))
        g = decay_rate * F.softplus(cast(a, acc) + self.dt_bias)
        if valid is not None:
            # Padding rows leave the state untouched: decay exp(0) = 1 and write strength 0.
            g, beta = g * valid[..., None], beta * valid[..., None]
        return g, beta

    def _out(self, o: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        lead = z.shape[:-1]
        z = z.reshape(*lead, self.num_v_heads, self.dv)
        return self.out_proj(self.norm(cast(o, dtype), z).reshape(*lead, self.value_dim))

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x_BTE: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.mode == "two_stream":
            return self._two_stream(x_BTE, ctx)
        if ctx.mode == "rows":
            return self._rows(x_BTE, ctx)
        if ctx.mode == "packed":
            seg = ctx.segments
            return seg.pack(self._causal(seg.unpack(x_BTE), None, seg.valid, None))
        cache = ctx.cache
        # Caches in which nothing is committed yet (a host-side bound of 0) hold zero states: the prefill's
        # recurrence starts from none, which it neither reads nor decays.
        return self._causal(x_BTE, cache.layers[self.layer_idx] if cache else None, ctx.valid, ctx.n_new,
                            empty=cache is not None and cache.bound == 0, in_place=ctx.in_place)

    def _causal(self, x, state: RecurrentState | None, valid, n_new, empty: bool = False,
                in_place: bool = False) -> torch.Tensor:
        if state is not None:
            state.settle()  # a causal pass reads and writes the state whole
        qkv, z, b, a = self.in_proj(x).split(self.split, dim=-1)
        mixed, conv_state = self._conv(qkv, state.conv if state else None, n_new)
        q, k, v = self._qkv(mixed)
        g, beta = self._gates(b, a, valid)
        initial = None if state is None or empty else state.ssm
        o, final, self.last_path = gated_delta(q, k, v, g, beta, initial_state=initial, check=False,
                                                 in_place=initial is not None)
        if state is not None and in_place:  # into the cache's own tensors (ForwardContext.in_place)
            state.conv = written(state.conv, conv_state)
            if final is not state.ssm:
                state.ssm = written(state.ssm, final)
        elif state is not None:
            state.conv, state.ssm = conv_state, final
        return self._out(o, z, x.dtype)

    def _rows(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """[clean x c ; noisy x m ; padding] after the cache, in one closed-form pass from the committed state:
        the clean rows' outputs are the causal ones, and the noisy block (which starts from the state after the
        clean rows) is read from the state at its end. One causal conv serves both (a noisy row's window holds
        the clean inputs before the block). With a record, the pass keeps what commits any clean prefix."""
        state = ctx.cache.layers[self.layer_idx]
        meta = ctx.row_meta
        qkv, z, b, a = self.in_proj(x).split(self.split, dim=-1)
        tree = ctx.tree
        weight = self.conv1d.weight[:, 0, :]
        full = conv_inputs(qkv, state.conv, weight.shape[1])  # what the conv reads, and a commit keeps
        if tree is None:
            mixed, _ = self._conv(qkv, state.conv, full=full)
        else:
            mixed = F.silu(tree_conv1d(qkv, weight, state.conv, windows=tree.windows(weight.shape[1]), full=full))
        q, k, v = self._qkv(mixed)
        g, beta = self._gates(b, a, meta.valid)
        if tree is not None:
            # Each noisy group continues from the state after its own clean prefix and reads its end state.
            scan = gated_delta_rows(q, k, v, g, beta, state.ssm, self.dk**-0.5, path=tree.path, reads=tree.reads,
                                    pending=state.pending)
        else:
            # Noisy rows read the block-end state (ForwardContext.row_meta).
            scan = gated_delta_rows(q, k, v, g, beta, state.ssm, self.dk**-0.5, reads=meta.reads,
                                    pending=state.pending)
        o = scan.o
        self.last_path = "rows"
        if ctx.record is not None:
            ctx.record.gdn[self.layer_idx] = (scan, full)
        return self._out(o, z, x.dtype)

    def _two_stream(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """[x0 ; xt_1 .. xt_V] rows: clean recurrence per document; each noisy block seeded by the clean state
        before it (method §2.2). The short conv of a noisy block starts from the K-1 clean inputs before it.

        A noisy stream of kept blocks only (``flare.model.noisy_blocks``): the projections in and out run on its
        rows; the recurrence runs on the full layout, the kept rows' inputs placed in it (zeros elsewhere: the
        dropped blocks are computed and read by no one) and their outputs read back out."""
        layout, seg = ctx.layout, ctx.segments
        B, L, V = x.shape[0], seg.length, layout.views
        proj = self.in_proj(x)  # [B, L + noisy rows, P]
        z = proj.split(self.split, dim=-1)[1]
        proj_n = proj[:, L:]
        if layout.noisy is not None:
            idx = layout.noisy.full_index(V, L)[..., None]
            proj_n = proj.new_zeros(B, V * L + 1, proj.shape[-1]).scatter(1, idx.expand_as(proj_n), proj_n)[:, :-1]
        o_c, o_n = self._two_stream_mix(proj[:, :L], proj_n, layout, seg)
        if layout.noisy is not None:
            o_n = F.pad(o_n, (0, 0, 0, 1)).gather(1, idx.expand(-1, -1, o_n.shape[-1]))
        o = torch.cat([o_c, o_n], dim=1)
        return self._out(o.view(*o.shape[:2], self.num_v_heads, self.dv), z, x.dtype)

    def _two_stream_mix(self, proj_c, proj_n, layout, seg) -> tuple[torch.Tensor, torch.Tensor]:
        """The recurrence's outputs before the output gate: clean [B, L, H * Dv], noisy [B, V * L, H * Dv]."""
        B, L, V, bs = proj_c.shape[0], seg.length, layout.views, layout.block_size
        clean = seg.unpack(proj_c)  # [S, Ls, P]
        noisy = seg.unpack(proj_n.reshape(B, V, L, -1).transpose(1, 2))  # [S, Ls, V, P]
        noisy = noisy.transpose(1, 2)  # [S, V, Ls, P]
        S, Ls = clean.shape[:2]
        nb = Ls // bs
        qkv_c, _, b_c, a_c = clean.split(self.split, dim=-1)
        qkv_n, _, b_n, a_n = noisy.split(self.split, dim=-1)

        mixed_c, _ = self._conv(qkv_c, None)
        K1 = self.conv1d.weight.shape[-1] - 1
        # Conv state of block b: the K-1 clean inputs before it (zeros before the document start).
        padded = F.pad(qkv_c, (0, 0, K1, 0))  # [S, K-1+Ls, C]
        starts = padded.unfold(1, K1, bs)[:, :nb].transpose(-1, -2)  # [S, nb, K-1, C]
        init = starts[:, None].expand(S, V, nb, K1, -1).reshape(S * V * nb, K1, -1)
        mixed_n, _ = self._conv(qkv_n.reshape(S * V * nb, bs, -1), init)
        mixed_n = mixed_n.reshape(S, V, Ls, -1)

        q_c, k_c, v_c = self._qkv(mixed_c)
        q_n, k_n, v_n = self._qkv(mixed_n)
        valid_n = seg.valid[:, None].expand(S, V, Ls)
        g_c, beta_c = self._gates(b_c, a_c, seg.valid)
        g_n, beta_n = self._gates(b_n, a_n, valid_n)
        o_c, o_n = gated_delta_two_stream(
            q_c, k_c, v_c, g_c, beta_c, q_n, k_n, v_n, g_n, beta_n, bs, clean_readout=layout.clean_readout
        )
        self.last_path = "two_stream"
        o_c = seg.pack(o_c.flatten(2))  # [B, L, H * Dv]
        o_n = seg.pack(o_n.flatten(3).transpose(1, 2))  # [B, L, V, H * Dv]
        return o_c, o_n.transpose(1, 2).reshape(B, V * L, -1)

