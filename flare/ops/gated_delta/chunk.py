"""Chunked (WY / UT-transform) implementation of the gated delta rule.

Same recurrence and tensor contract as :func:`flare.ops.gated_delta.naive.gated_delta_naive`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from flare.ops.gated_delta.naive import expand_heads, validate_inputs
from flare.ops.precision import EXP_FLOOR, accum_dtype, no_autocast
from flare.ops.triangular import solve_unit_lower

__all__ = ["ChunkScan", "chunk_scan", "gated_delta_chunk"]

# Derivation. Inside one chunk (local positions i = 0..C-1, state S0 at the chunk
# start) write the update as S_i = e^{g_i} S_{i-1} + k_i u_i^T with the "delta"
#     u_i = beta_i (v_i - e^{g_i} S_{i-1}^T k_i).
# Let G_i = sum_{j<=i} g_j (cumulative log decay). Unrolling the recurrence,
#     S_i = e^{G_i} S0 + sum_{j<=i} e^{G_i - G_j} k_j u_j^T,
# hence e^{g_i} S_{i-1} = e^{G_i} S0 + sum_{j<i} e^{G_i - G_j} k_j u_j^T and
#     u_i + sum_{j<i} beta_i e^{G_i - G_j} (k_i . k_j) u_j = beta_i v_i - beta_i e^{G_i} S0^T k_i.
# Every delta depends on the earlier deltas of the chunk only through the strictly
# lower-triangular matrix A_ij = beta_i e^{G_i - G_j} (k_i . k_j) (j < i), i.e.
#     (I + A) U = diag(beta) V - diag(beta e^G) K S0.
# (I + A) is unit lower triangular, so one forward substitution (solve_triangular,
# unitriangular) applies all the sequential delta-rule corrections at once. By
# linearity U = Ut - W S0 with Ut = (I+A)^{-1} diag(beta) V and
# W = (I+A)^{-1} diag(beta e^G) K, both independent of S0 and so computed for all
# chunks in parallel. The scan over chunks then needs only matmuls:
#     o_i   = scale * (e^{G_i} q_i^T S0 + sum_{j<=i} e^{G_i - G_j} (q_i . k_j) u_j)
#     S_end = e^{G_{C-1}} S0 + sum_j e^{G_{C-1} - G_j} k_j u_j^T.
# All decay factors are exponentials of non-positive differences (no division by
# e^{G}), so nothing overflows. Zero padding (g = 0, beta = 0) gives u = 0 and no
# decay, so padded positions leave the state unchanged.


def _to_chunks(x: torch.Tensor, pad: int, n_chunks: int, chunk: int) -> torch.Tensor:
    """``[B, T, H, D]`` -> contiguous fp32 ``[B, H, N, C, D]``, zero-padding T by ``pad``.

    Contiguous so that the batched matmuls below take their operands as they are (a permuted view would be
    copied again by every matmul that reads it).
    """
    x = x.to(accum_dtype(x.dtype))
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    B, _, H, D = x.shape
    return x.reshape(B, n_chunks, chunk, H, D).permute(0, 3, 1, 2, 4).contiguous()


class ChunkScan(NamedTuple):
    """Outputs of the chunk scan and, when kept, its per-chunk quantities (for two_stream's clean-state reads).

    Kept tensors are in the accumulation dtype, heads expanded to H, layout ``[B, H, N, C, ...]`` (N chunks of C
    positions, T zero-padded to N * C). The clean state after local position i of chunk n is
    ``e^{cum[n, i]} starts[n] + sum_{j <= i} decay[n, i, j] k[n, j] u[n, j]^T``.
    """

    o: torch.Tensor  # [B, T, H, Dv] in v.dtype
    final_state: torch.Tensor  # [B, H, Dk, Dv]
    block_states: torch.Tensor | None = None  # [B, ceil(T / bs), H, Dk, Dv] when asked for
    cum: torch.Tensor | None = None  # [B, H, N, C] cumulative log decay G_i
    decay: torch.Tensor | None = None  # [B, H, N, C, C] e^{G_i - G_j} on j <= i, else 0
    k: torch.Tensor | None = None  # [B, H, N, C, Dk]
    u: torch.Tensor | None = None  # [B, H, N, C, Dv] deltas u_i
    starts: torch.Tensor | None = None  # [B, H, N, Dk, Dv] state before each chunk


# Chunk sizes the dispatcher (``flare.ops.gated_delta.gated_delta``) picks from: the one that pads a sequence
# least, the first on a tie. Padding is computed and thrown away: a 32-token prompt padded to 64 took 2.5x the
# time it takes in chunks of 32 (8 sequences, a 0.75B Qwen3.5 shape's GDN layer, bf16, one thread: 30.7 vs
# 12.6 ms), 200 tokens 0.86x, 4,000 tokens 0.80x; where both pad alike (192, 512, 1,000) chunks of 64 are as
# fast or faster, with gradients too (``chunk_size_for``).
CHUNK_SIZES = (64, 32)


def chunk_size_for(T: int) -> int:
    """The chunk size of ``CHUNK_SIZES`` that pads ``T`` positions least (the first on a tie)."""
    return min(CHUNK_SIZES, key=lambda c: (-T) % c)


@no_autocast
def gated_delta_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    *,
    block_states: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule (all math in fp32, under autocast too; differentiable via autograd).

    Args:
        q, k: ``[B, T, Hk, Dk]``, ``H % Hk == 0`` (already L2-normalised; no normalisation here).
        v: ``[B, T, H, Dv]``.
        g: ``[B, T, H]`` log decay (``<= 0``).
        beta: ``[B, T, H]`` write strength in ``(0, 1)``.
        initial_state: ``[B, H, Dk, Dv]`` or ``None`` (zeros).
        scale: output scale, defaults to ``Dk ** -0.5``.
        chunk_size: positions per chunk ``C`` (T is zero-padded to a multiple of C). With ``block_states`` it is
            rounded down to a multiple of the block size (at least one block), so block ends fall at fixed local
            positions of every chunk.
        block_states: block size ``bs``; when given, also return the state after the end of every block of
            ``bs`` positions (the last block may be partial: its entry is the final state). Costs
            ``O(T / bs * Dk * Dv)`` memory, never a per-position state.

    Returns:
        ``o`` ``[B, T, H, Dv]`` in ``v.dtype`` and ``final_state`` ``[B, H, Dk, Dv]`` fp32; with
        ``block_states`` also ``block_states`` ``[B, ceil(T / bs), H, Dk, Dv]`` fp32 (``block_states[:, b]`` is
        the state after position ``min((b + 1) * bs, T) - 1``).
    """
    B, T, H, Dk, Dv = validate_inputs(q, k, v, g, beta, initial_state)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if block_states is not None:
        if isinstance(block_states, bool) or not isinstance(block_states, int) or block_states < 1:
            raise ValueError(f"block_states must be None or a positive int, got {block_states!r}")
        chunk_size = block_states * max(1, chunk_size // block_states)
    if T == 0:
        f32, dev = accum_dtype(v.dtype), v.device
        if initial_state is None:
            state = torch.zeros(B, H, Dk, Dv, dtype=f32, device=dev)
        else:
            state = initial_state.to(dtype=f32, device=dev, copy=True)
        o = torch.zeros(B, 0, H, Dv, dtype=v.dtype, device=dev)
        if block_states is not None:
            return o, state, torch.zeros(B, 0, H, Dk, Dv, dtype=f32, device=dev)
        return o, state
    scan = chunk_scan(q, k, v, g, beta, initial_state, scale, chunk_size, block_states=block_states)
    if block_states is None:
        return scan.o, scan.final_state
    return scan.o, scan.final_state, scan.block_states


@no_autocast
def chunk_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    scale: float | None,
    chunk_size: int,
    *,
    block_states: int | None = None,
    keep: bool = False,
) -> ChunkScan:
    """The algorithm behind :func:`gated_delta_chunk` on validated inputs with ``T >= 1``.

    ``block_states`` (if given) must divide ``chunk_size``; ``keep`` also returns the per-chunk quantities.
    """
    B, T, H, Dk, Dv = validate_inputs(q, k, v, g, beta, initial_state)
    if scale is None:
        scale = Dk**-0.5
    f32, dev = accum_dtype(v.dtype), v.device
    # None: a zero state, which the first chunk then neither reads nor decays (a prefill from empty caches: on a
    # 0.75B Qwen3.5 shape three passes over 8 MB of states a layer at 8 sequences). The state is never written
    # in place, so a given one is read as it is (no copy).
    state = None if initial_state is None else initial_state.to(dtype=f32, device=dev)

    q, k = expand_heads(q, H), expand_heads(k, H)
    C = chunk_size
    pad = (-T) % C
    N = (T + pad) // C
    qc, kc, vc = (_to_chunks(x, pad, N, C) for x in (q, k, v))  # [B, H, N, C, D]
    gc = _to_chunks(g[..., None], pad, N, C)[..., 0]  # [B, H, N, C]
    bc = _to_chunks(beta[..., None], pad, N, C)[..., 0]
    qc = qc * scale

    cum = gc.cumsum(dim=-1)  # G_i
    incl = torch.ones(C, C, dtype=torch.bool, device=dev).tril()  # j <= i
    strict = incl.tril(-1)  # j < i
    # e^{G_i - G_j} on j <= i, 0 elsewhere (masked before exp: no overflow; floored: no slow underflow).
    diff = (cum[..., :, None] - cum[..., None, :]).masked_fill(~incl, 0.0).clamp_(min=EXP_FLOOR)
    decay = diff.exp().masked_fill(~incl, 0.0)  # [B, H, N, C, C]

    kk = kc @ kc.transpose(-1, -2)
    A = (bc[..., :, None] * decay * kk).masked_fill(~strict, 0.0)
    rhs = torch.cat([bc[..., None] * vc, (bc * cum.exp())[..., None] * kc], dim=-1)
    sol = solve_unit_lower(A, rhs)
    u_base, w = sol.split([Dv, Dk], dim=-1)  # Ut [.., C, Dv], W [.., C, Dk]

    attn = (qc @ kc.transpose(-1, -2)) * decay  # intra-chunk, scaled q
    q_in = qc * cum.exp()[..., None]  # reads S0
    k_out = kc * (cum[..., -1:] - cum).exp()[..., None]  # writes to chunk end
    chunk_decay = cum[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]

    if block_states is not None:
        # Block ends at local positions e_m = (m + 1) * bs - 1, m < M = C / bs. Unrolled as above,
        #     S_{e_m} = e^{G_{e_m}} S0 + sum_{j <= e_m} e^{G_{e_m} - G_j} k_j u_j^T = e^{G_{e_m}} S0 + X_m U,
        # X_m = [e^{G_{e_m} - G_j} k_j]_j^T ([Dk, C], zero for j > e_m; rows e_m of the decay matrix). X is
        # independent of S0, so it is built for all chunks at once; in the scan all block ends of a chunk are one
        # [M * Dk, C] @ [C, Dv] GEMM on top of the decayed S0.
        bs = block_states
        M = C // bs
        n_blocks = -(-T // bs)
        ends = torch.arange(bs - 1, C, bs, device=dev)
        k_t = kc.transpose(-1, -2).contiguous()  # contiguous operands: a contiguous product, a free reshape
        x_end = (k_t[..., None, :, :] * decay[..., ends, None, :]).reshape(B, H, N, M * Dk, C)
        s0_decay = cum[..., ends].exp()[..., None, None]  # [B, H, N, M, 1, 1]
        blocks: list[torch.Tensor] = []

    outs: list[torch.Tensor] = []
    us: list[torch.Tensor] = []
    starts: list[torch.Tensor] = []
    if state is None and (keep or block_states is not None):  # these read the state before each chunk
        state = torch.zeros(B, H, Dk, Dv, dtype=f32, device=dev)
    for n in range(N):
        u = u_base[:, :, n] if state is None else u_base[:, :, n] - w[:, :, n] @ state  # deltas u_i [B, H, C, Dv]
        if keep:
            starts.append(state)
            us.append(u)
        out = attn[:, :, n] @ u
        outs.append(out if state is None else out.add_(q_in[:, :, n] @ state))
        if block_states is not None:
            m = min(M, n_blocks - n * M)  # block ends that exist (T may end inside this chunk)
            s_blk = (x_end[:, :, n, : m * Dk] @ u).view(B, H, m, Dk, Dv) + s0_decay[:, :, n, :m] * state[:, :, None]
            blocks.append(s_blk)  # [B, H, m, Dk, Dv]
        written = k_out[:, :, n].transpose(-1, -2) @ u
        state = written if state is None else written.addcmul_(chunk_decay[:, :, n], state)

    o = torch.stack(outs, dim=2)  # [B, H, N, C, Dv]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, Dv)[:, :T]
    blk = None
    if block_states is not None:
        # Padded positions (g = 0, beta = 0) leave the state unchanged, so the last (possibly partial) block
        # ends in the final state: use it verbatim.
        blocks[-1] = torch.cat([blocks[-1][:, :, :-1], state[:, :, None]], dim=2)
        blk = torch.cat(blocks, dim=2).transpose(1, 2)  # [B, n_blocks, H, Dk, Dv], a view of [B, H, n_blocks, ..]
    if not keep:
        return ChunkScan(o.to(v.dtype), state, blk)
    return ChunkScan(o.to(v.dtype), state, blk, cum, decay, kc, torch.stack(us, dim=2), torch.stack(starts, dim=2))

