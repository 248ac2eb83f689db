"""Two-stream gated delta rule: a clean causal stream and block-diffusion noisy views seeded from it.

Recurrent-state scheduling (docs/method.md §2.2). Inputs are "segments": each row is ONE document starting at
position 0, split into blocks ``b`` covering ``[b * bs, min((b + 1) * bs, T))`` (the last block may be partial).

* Clean stream: the ordinary gated delta recurrence from a zero state. ``clean_readout="token"`` reads
  ``o_c[t] = scale * S_t^T q_c[t]``; ``clean_readout="block"`` reads the end state of t's block,
  ``o_c[t] = scale * S_{e(t)}^T q_c[t]`` (pure block-diffusion ablation: a block-causal clean stream).
* Noisy view ``v``, block ``b``: starts from the CLEAN state after position ``b * bs - 1`` (zero for ``b = 0``),
  runs the recurrence over the block's own noisy inputs only, and every position reads the block-end state,
  ``o_n[v, t] = scale * S_end(v, b)^T q_n[v, t]``. No noisy state leaks between blocks or views; gradients reach
  the clean stream through the seeded states.

Tensor contract (``H % Hk == 0``, value head h reads q/k head ``h // (H / Hk)``)::

    clean:  q_c, k_c [S, T, Hk, Dk]; v_c [S, T, H, Dv]; g_c, beta_c [S, T, H]
    noisy:  q_n, k_n [S, V, T, Hk, Dk]; v_n [S, V, T, H, Dv]; g_n, beta_n [S, V, T, H]   (V >= 1 views)
    ->      o_c [S, T, H, Dv] (v_c's dtype), o_n [S, V, T, H, Dv] (v_n's dtype)

Padding positions (g = 0, beta = 0) leave every state unchanged. All math in ``accum_dtype``, under autocast too.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from flare.ops.gated_delta.chunk import ChunkScan, chunk_scan
from flare.ops.gated_delta.naive import expand_heads, gated_delta_naive, validate_inputs
from flare.ops.precision import accum_dtype, no_autocast

__all__ = ["gated_delta_two_stream", "gated_delta_two_stream_reference", "validate_two_stream_inputs"]

CLEAN_READOUTS = ("token", "block")

# Efficient form.
#
# Noisy block, closed form. For one block (local positions i < L = bs, initial state S0 = the clean state before
# the block) the chunk derivation in chunk.py gives, with G_i = sum_{j<=i} g_j and G_e = G_{L-1},
#     U = Ut - W S0,  Ut = T diag(beta) V,  W = T diag(beta e^G) K,  T = (I + A)^{-1},
#     A_ij = beta_i e^{G_i - G_j} (k_i . k_j) for j < i,
#     S_end = e^{G_e} S0 + Kw^T U,  Kw_j = e^{G_e - G_j} k_j.
# Every position reads S_end, so with M = Q Kw^T ([L, L], all pairs: in-block bidirectional)
#     o = scale * Q S_end = P S0 + (M T) diag(beta) V,   P = e^{G_e} Q - (M T) diag(beta e^G) K   (Q scaled).
# A is strictly lower triangular (nilpotent), so for small L, T = (I - A)(I + A^2)(I + A^4)... exactly: a few
# tiny batched matmuls, much cheaper than a batched triangular solve of thousands of L x L systems.
#
# Seeding without block states. Chunks hold C = a multiple of bs positions, so block m of chunk n starts at local
# position m * bs and its seed S0 is the clean state after local position s = m * bs - 1 of the same chunk (s = -1,
# the chunk-start state, for m = 0). From the chunk scan (G_{-1} = 0 and an empty sum for s = -1),
#     S_s = e^{G_s} S_start(n) + sum_{j <= s} e^{G_s - G_j} k_j u_j^T,
# hence   P S_s = e^{G_s} (P S_start(n)) + ((P K_n^T) . w_s) U_n   (w_s = row s of the chunk's decay matrix):
# an attention-like read of the clean chunk's keys and deltas plus one read of the chunk-start state. No block
# state is ever formed: per segment the op keeps O(T / C * Dk * Dv) state memory (autograd included), not
# O(T / bs * Dk * Dv), and no per-view or per-position state at all. The clean "block" readout is the same read
# with P = the scaled clean queries and s = the block's own end.

NEUMANN_MAX_BLOCK = 8  # above this, invert (I + A) with a triangular solve (the series' cancellations grow)
CHUNK = 32  # target clean chunk length, rounded down to a multiple of the block size (32 measured ~7% faster
# than 64 on CPU at T=2048, bs=4, Dk=Dv=64; outputs agree either way)


def validate_two_stream_inputs(
    q_c: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    g_c: torch.Tensor,
    beta_c: torch.Tensor,
    q_n: torch.Tensor,
    k_n: torch.Tensor,
    v_n: torch.Tensor,
    g_n: torch.Tensor,
    beta_n: torch.Tensor,
    block_size: int,
    clean_readout: str,
) -> tuple[int, int, int, int, int, int]:
    """Check the two-stream contract and return ``(S, V, T, H, Dk, Dv)``.

    Raises ``ValueError`` naming the offending tensor (``q_c`` ... ``beta_n``) or argument.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if clean_readout not in CLEAN_READOUTS:
        raise ValueError(f"clean_readout must be one of {CLEAN_READOUTS}, got {clean_readout!r}")
    try:
        S, T, H, Dk, Dv = validate_inputs(q_c, k_c, v_c, g_c, beta_c, None)
    except ValueError as err:  # name the clean tensors q_c ... beta_c
        raise ValueError(re.sub(r"\b(q|k|v|g|beta)\b", r"\1_c", str(err))) from None
    Hk = q_c.shape[2]
    for name, x, ndim in (("q_n", q_n, 5), ("k_n", k_n, 5), ("v_n", v_n, 5), ("g_n", g_n, 4), ("beta_n", beta_n, 4)):
        if x.ndim != ndim:
            raise ValueError(f"{name} must have {ndim} dims [S, V, T, ...], got shape {tuple(x.shape)}")
    V = q_n.shape[1]
    if V < 1:
        raise ValueError(f"q_n must hold at least one noisy view (dim 1), got shape {tuple(q_n.shape)}")
    expected = {
        "q_n": (S, V, T, Hk, Dk),
        "k_n": (S, V, T, Hk, Dk),
        "v_n": (S, V, T, H, Dv),
        "g_n": (S, V, T, H),
        "beta_n": (S, V, T, H),
    }
    for name, x in (("q_n", q_n), ("k_n", k_n), ("v_n", v_n), ("g_n", g_n), ("beta_n", beta_n)):
        if tuple(x.shape) != expected[name]:
            raise ValueError(
                f"{name} must have shape {expected[name]} (S, V, T from the clean inputs and q_n), "
                f"got {tuple(x.shape)}"
            )
    return S, V, T, H, Dk, Dv


@no_autocast
def gated_delta_two_stream_reference(
    q_c: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    g_c: torch.Tensor,
    beta_c: torch.Tensor,
    q_n: torch.Tensor,
    k_n: torch.Tensor,
    v_n: torch.Tensor,
    g_n: torch.Tensor,
    beta_n: torch.Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    clean_readout: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth: literal loops over segments, blocks and views, built on ``gated_delta_naive``. Slow.

    Same contract and semantics as :func:`gated_delta_two_stream` (see the module docstring).
    """
    S, V, T, H, Dk, Dv = validate_two_stream_inputs(
        q_c, k_c, v_c, g_c, beta_c, q_n, k_n, v_n, g_n, beta_n, block_size, clean_readout
    )
    if scale is None:
        scale = Dk**-0.5
    acc = accum_dtype(v_c.dtype)
    bs = block_size
    n_blocks = -(-T // bs)
    o_c_rows: list[torch.Tensor] = []
    o_n_rows: list[torch.Tensor] = []
    for s in range(S):
        clean = (x[s : s + 1] for x in (q_c, k_c, v_c, g_c, beta_c))
        o_tok, _, states = gated_delta_naive(*clean, scale=scale, return_all_states=True)  # states [1, T, H, Dk, Dv]
        q_cs = expand_heads(q_c[s : s + 1], H)[0].to(acc)  # [T, H, Dk]
        o_blk: list[torch.Tensor] = []
        views: list[list[torch.Tensor]] = [[] for _ in range(V)]
        for b in range(n_blocks):
            lo, hi = b * bs, min((b + 1) * bs, T)
            end_state = states[0, hi - 1]  # [H, Dk, Dv]
            for t in range(lo, hi):
                o_blk.append(scale * torch.einsum("hk,hkv->hv", q_cs[t], end_state))
            init = states[:, lo - 1] if b > 0 else None
            for vi in range(V):
                noisy = (x[s : s + 1, vi, lo:hi] for x in (q_n, k_n, v_n, g_n, beta_n))
                _, s_end = gated_delta_naive(*noisy, initial_state=init, scale=scale)  # [1, H, Dk, Dv]
                q_blk = expand_heads(q_n[s : s + 1, vi, lo:hi], H)[0].to(acc)  # [L, H, Dk]
                views[vi].append(scale * torch.einsum("lhk,hkv->lhv", q_blk, s_end[0]))
        if clean_readout == "token":
            o_c_rows.append(o_tok[0].to(acc))
        else:
            o_c_rows.append(torch.stack(o_blk) if T else torch.zeros(0, H, Dv, dtype=acc, device=v_c.device))
        if T:
            o_n_rows.append(torch.stack([torch.cat(blocks) for blocks in views]))
        else:
            o_n_rows.append(torch.zeros(V, 0, H, Dv, dtype=acc, device=v_n.device))
    if S == 0:
        return (torch.zeros(0, T, H, Dv, dtype=v_c.dtype, device=v_c.device),
                torch.zeros(0, V, T, H, Dv, dtype=v_n.dtype, device=v_n.device))
    return torch.stack(o_c_rows).to(v_c.dtype), torch.stack(o_n_rows).to(v_n.dtype)


def _blocks(x: torch.Tensor, n_blocks: int, bs: int, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """``[S, V, T, Hx, *D]`` -> contiguous ``[S, heads, n_blocks, V, bs, *D]`` in ``dtype``, in one copy.

    T is zero-padded (g = beta = 0: no-op positions); grouped q/k heads (``Hx < heads``) are repeated so that value
    head h reads head ``h // (heads / Hx)``.
    """
    S, V, T, Hx = x.shape[:4]
    extra = x.shape[4:]
    pad = n_blocks * bs - T
    if pad:
        x = F.pad(x, (0, 0) * len(extra) + (0, 0, 0, pad))
    x = x.reshape(S, V, n_blocks, bs, Hx, *extra).permute(0, 4, 2, 1, 3, *range(5, 5 + len(extra)))
    if Hx != heads:
        x = x[:, :, None].expand(S, Hx, heads // Hx, *x.shape[2:]).reshape(S, heads, *x.shape[2:])
    return x.contiguous().to(dtype)  # (`.to(memory_format=...)` alone may return the permuted view itself)


def _inverse_unit_lower(A: torch.Tensor) -> torch.Tensor:
    """``(I + A)^{-1}`` for strictly lower triangular ``A`` ``[..., L, L]``."""
    L = A.shape[-1]
    eye = torch.eye(L, dtype=A.dtype, device=A.device)
    if L > NEUMANN_MAX_BLOCK:
        return torch.linalg.solve_triangular(A, eye.expand_as(A), upper=False, unitriangular=True)
    # (I + A)^{-1} = sum_{p < L} (-A)^p = (I - A)(I + A^2)(I + A^4)...  since A^L = 0.
    power = -A
    inv = eye + power
    terms = 2
    while terms < L:
        power = power @ power
        inv = inv + inv @ power
        terms *= 2
    return inv


def _read_clean_states(
    rows: torch.Tensor, scan: ChunkScan, pos_cum: torch.Tensor, pos_decay: torch.Tensor
) -> torch.Tensor:
    """``rows`` ``[S, H, N, M, R, Dk]`` (R rows per block m of chunk n) times the clean state after local position
    ``s`` of chunk n, given ``pos_cum = G_s`` ``[S, H, N, M]`` and ``pos_decay`` = row s of the chunk's decay matrix
    ``[S, H, N, M, C]`` (``G_s = 0`` and a zero row for the chunk-start state itself):
    ``rows @ S_s = e^{G_s} rows @ S_start(n) + ((rows @ K_n^T) * w_s) @ U_n`` (module comment).

    Returns ``[S, H, N, M, R, Dv]``.
    """
    S, H, N, M, R, Dk = rows.shape
    C, Dv = scan.k.shape[-2], scan.u.shape[-1]
    batch = S * H * N
    scores = (rows.reshape(batch, M * R, Dk) @ scan.k.reshape(batch, C, Dk).transpose(-1, -2)).view(
        S, H, N, M, R, C
    ) * pos_decay[..., None, :]
    from_start = (rows * pos_cum.exp()[..., None, None]).reshape(batch, M * R, Dk) @ scan.starts.reshape(
        batch, Dk, Dv
    )
    out = torch.baddbmm(from_start, scores.view(batch, M * R, C), scan.u.reshape(batch, C, Dv))
    return out.view(S, H, N, M, R, Dv)


@no_autocast
def gated_delta_two_stream(
    q_c: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    g_c: torch.Tensor,
    beta_c: torch.Tensor,
    q_n: torch.Tensor,
    k_n: torch.Tensor,
    v_n: torch.Tensor,
    g_n: torch.Tensor,
    beta_n: torch.Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    clean_readout: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-stream gated delta rule, efficient form (differentiable via autograd).

    The clean stream runs the chunked algorithm (chunks of a multiple of ``block_size`` positions); all noisy
    blocks of all segments and views then run at once in closed (WY) form, seeded by the clean state before their
    block, which is read from the chunk-start states and the chunk's deltas without ever forming per-block states
    (see the comment above ``NEUMANN_MAX_BLOCK``). See the module docstring for shapes and semantics.

    Args:
        q_c, k_c, v_c, g_c, beta_c: clean stream, ``[S, T, Hk, Dk]`` / ``[S, T, H, Dv]`` / ``[S, T, H]``.
        q_n, k_n, v_n, g_n, beta_n: noisy views, ``[S, V, T, Hk, Dk]`` / ``[S, V, T, H, Dv]`` / ``[S, V, T, H]``.
        block_size: positions per diffusion block (``>= 1``; T need not be a multiple).
        scale: output scale, defaults to ``Dk ** -0.5``.
        clean_readout: ``"token"`` (causal) or ``"block"`` (every clean position reads its block-end state).

    Returns:
        ``(o_c [S, T, H, Dv] in v_c.dtype, o_n [S, V, T, H, Dv] in v_n.dtype)``.

    Raises:
        ValueError: bad ``block_size`` / ``clean_readout`` or any shape mismatch (naming the tensor).
    """
    S, V, T, H, Dk, Dv = validate_two_stream_inputs(
        q_c, k_c, v_c, g_c, beta_c, q_n, k_n, v_n, g_n, beta_n, block_size, clean_readout
    )
    if scale is None:
        scale = Dk**-0.5
    acc, dev = accum_dtype(v_c.dtype), v_c.device
    if S == 0 or T == 0:
        return (torch.zeros(S, T, H, Dv, dtype=v_c.dtype, device=dev),
                torch.zeros(S, V, T, H, Dv, dtype=v_n.dtype, device=dev))
    bs = block_size
    C = bs * max(1, CHUNK // bs)  # chunk: a multiple of the block size
    M = C // bs  # blocks per chunk

    scan = chunk_scan(q_c, k_c, v_c, g_c, beta_c, None, scale, C, keep=True)
    o_c = scan.o
    N = scan.cum.shape[2]
    nbp = N * M  # blocks, T zero-padded to N * C (padded positions change no state)
    ends = torch.arange(bs - 1, C, bs, device=dev)  # local block ends
    if clean_readout == "block":  # clean block m of chunk n reads the state after its own end
        q = _blocks(q_c[:, None], nbp, bs, H, acc)[:, :, :, 0] * scale  # [S, H, nbp, bs, Dk]
        rows = q.view(S, H, N, M, bs, Dk)
        o_c = _read_clean_states(rows, scan, scan.cum[..., ends], scan.decay[..., ends, :])
        o_c = o_c.permute(0, 2, 3, 4, 1, 5).reshape(S, nbp * bs, H, Dv)[:, :T]
    # Noisy block m of chunk n is seeded by the clean state after local position m * bs - 1: the end of clean
    # block m - 1, or for m = 0 the chunk-start state itself (G = 0, no deltas: a zero decay row).
    seed_cum = F.pad(scan.cum[..., ends[:-1]], (1, 0))  # [S, H, N, M]
    seed_decay = F.pad(scan.decay[..., ends[:-1], :], (0, 0, 1, 0))  # [S, H, N, M, C]

    # Noisy blocks, contiguous [S, H, nbp, V, L, ...] (L = bs).
    q, k, v = (_blocks(x, nbp, bs, H, acc) for x in (q_n, k_n, v_n))
    g, beta = (_blocks(x[..., None], nbp, bs, H, acc)[..., 0] for x in (g_n, beta_n))
    cum = g.cumsum(dim=-1)  # G_i
    g_end = cum[..., -1:]  # G_e, [.., 1]
    incl = torch.ones(bs, bs, dtype=torch.bool, device=dev).tril()
    diff = (cum[..., :, None] - cum[..., None, :]).masked_fill(~incl, 0.0)  # masked before exp: no overflow
    decay = diff.exp().masked_fill(~incl, 0.0)
    A = (beta[..., :, None] * decay * (k @ k.transpose(-1, -2))).masked_fill(~incl.tril(-1), 0.0)
    k_w = k * (scale * (g_end - cum).exp())[..., None]  # scale * Kw
    mt = ((q @ k_w.transpose(-1, -2)) @ _inverse_unit_lower(A)).view(-1, bs, bs)  # scale * M T
    rows = (scale * g_end.exp())[..., None] * q
    p = torch.baddbmm(rows.view(-1, bs, Dk), mt, ((beta * cum.exp())[..., None] * k).view(-1, bs, Dk), alpha=-1)
    seeded = _read_clean_states(p.view(S, H, N, M, V * bs, Dk), scan, seed_cum, seed_decay)  # P S0
    o_n = torch.baddbmm(seeded.view(-1, bs, Dv), mt, (beta[..., None] * v).view(-1, bs, Dv))  # + (M T) diag(b) V
    o_n = o_n.view(S, H, nbp, V, bs, Dv).permute(0, 3, 2, 4, 1, 5).reshape(S, V, nbp * bs, H, Dv)[:, :, :T]
    return o_c.to(v_c.dtype), o_n.to(v_n.dtype)

