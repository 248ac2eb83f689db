"""The gated delta rule over one short run of inference rows, in closed form, with the state after any prefix.

A read-only rows forward (AR-Trust's verify block, a denoising block) runs the recurrence over a few rows from
the committed state S0 and, later, commits the state after an accepted prefix. Stepping row by row costs a
dozen small ops per row; here the whole run is one chunk of the WY form (see ``chunk.py`` for the derivation):

    (I + A) U = diag(beta) (V - diag(e^G) K S0),   A_ij = beta_i e^{G_i - G_j} (k_i . k_j)  (j < i)
    o_i       = scale (e^{G_i} q_i^T S0 + sum_{j<=i} e^{G_i - G_j} (q_i . k_j) u_j)
    S_n       = e^{G_{n-1}} S0 + sum_{j<n} e^{G_{n-1} - G_j} k_j u_j^T      (the state after n rows)

so the outputs, the final state and every prefix state come from a few batched matmuls, and keeping the deltas
U makes a later commit of any prefix one more product (no per-row states are stored), or, without writing the
state at all, a few rows appended to its kept low-rank update (``pending.py``), which the next pass reads.

Rows may also form a tree (``path``): each row continues the recurrence of its ancestors only, e.g. several
noisy groups each seeded after a different clean prefix (AR-Trust drafting from every acceptance point). The
same equations hold with sums over ancestors instead of earlier rows and G_i summed along the row's path; since
ancestors come first, (I + A) stays unit lower triangular. ``reads`` lets a row read the state at another row
of its path (a noisy row reads its group's end state): o_i = scale q_i^T S_{reads(i)}.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from flare.ops.gated_delta.naive import expand_heads
from flare.ops.gated_delta.pending import PendingCommits, bmm4, write_update
from flare.ops.precision import EXP_FLOOR, accum_dtype, cast, faking, no_autocast
from flare.ops.triangular import solve_unit_lower


class RowsScan(NamedTuple):
    o: torch.Tensor  # [B, T, H, Dv] in v's dtype
    initial: torch.Tensor  # [B, H, Dk, Dv] S0 as stored (the state is S0 with ``pending`` applied)
    cum: torch.Tensor  # [B, H, T] G_i
    decay: torch.Tensor  # [B, H, T, T] e^{G_i - G_j} on j <= i (j on i's path), else 0
    k: torch.Tensor  # [B, H, T, Dk]
    u: torch.Tensor  # [B, H, T, Dv]
    pending: PendingCommits | None = None  # commits not yet written to ``initial``

    @property
    def final_state(self) -> torch.Tensor:
        """The state after the last row of the chain [B, H, Dk, Dv] (computed when asked for)."""
        B, _, T = self.cum.shape
        return self.state_after(torch.full((B,), T, device=self.cum.device))

    @no_autocast
    def update_after(self, n_B: torch.Tensor, last: torch.Tensor | None = None, rows: int | None = None,
                     live: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The state after the first n[b] rows of each sequence as an update of the state before them:
        ``S_n = decay * S + k^T u``, returned as (decay [B, H, 1, 1], k [B, H, rows, Dk], u [B, H, rows, Dv]).
        ``rows``: only the first rows can lie on an accepted prefix's path (the clean rows; default: all).
        ``last`` ((n - 1).clamp(min=0)) and ``live`` (n > 0, in the state's dtype), as [B, 1, 1, 1], when the
        caller already has them (once per commit, for every layer).
        Sequences with n = 0 get decay e^0 = 1 and zero rows: their state stays exactly as it was."""
        B, _, T = self.cum.shape
        if last is None:
            last = (n_B - 1).clamp(min=0).view(B, 1, 1, 1)
        if live is None:
            live = (n_B > 0).view(B, 1, 1, 1).to(self.cum.dtype)
        decay, k, u = updates_after([self], last, live, T if rows is None else rows)
        return decay[0], k[0], u[0]

    @no_autocast
    def state_after(self, n_B: torch.Tensor) -> torch.Tensor:
        """The state after the first n[b] rows of each sequence [B, H, Dk, Dv], as a new tensor (n = 0: the
        initial state)."""
        s0 = self.initial.clone() if self.pending is None else self.pending.state(self.initial)
        return write_update(s0, s0.shape[0], *self.update_after(n_B))


@no_autocast
def updates_after(scans: list[RowsScan], last: torch.Tensor, live: torch.Tensor, rows: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``RowsScan.update_after`` of passes of one shape (a model's recurrent layers), at once, stacked along a new
    first dimension L: (decay [L, B, H, 1, 1], k [L, B, H, rows, Dk], u [L, B, H, rows, Dv]). ``last`` and ``live``
    [B, 1, 1, 1] as ``update_after`` takes them."""
    L, (B, H, _) = len(scans), scans[0].cum.shape
    at = last.view(1, B, 1, 1, 1).expand(L, B, H, 1, rows)
    # (the small decays stacked whole and sliced once: a slice per layer costs more than the rows it saves)
    weight = torch.stack([s.decay for s in scans])[..., :rows].gather(3, at) * live  # [L, B, H, 1, rows]
    g_end = torch.stack([s.cum for s in scans]).unsqueeze(-1).gather(3, at[..., :1]) * live
    k = torch.stack([s.k[:, :, :rows] for s in scans]) * weight.transpose(-1, -2)
    u = torch.stack([s.u[:, :, :rows] for s in scans])
    return g_end.exp(), k, u


def _after(T: int, device: torch.device) -> torch.Tensor:
    """j > i for T rows [T, T]: what a chain's row never reads (a constant of every chain pass of that length,
    kept per length up to ``AFTER_KEPT_ROWS`` and then for good: a CUDA graph of a rows forward reads it by
    address, so it must never be dropped; made afresh for longer passes and where tensors are fake or traced)."""
    return _after_made(T, device) if faking() or T > AFTER_KEPT_ROWS else _after_kept(T, device)


def _after_made(T: int, device: torch.device) -> torch.Tensor:
    return ~torch.ones(T, T, dtype=torch.bool, device=device).tril()


def _after_normal(T: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # kept beyond decoding's inference mode: a normal tensor
        return _after_made(T, device)


AFTER_KEPT_ROWS = 64
_after_kept = functools.cache(_after_normal)


@no_autocast
def gated_delta_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    scale: float,
    path: torch.Tensor | None = None,
    reads: torch.Tensor | None = None,
    pending: PendingCommits | None = None,
) -> RowsScan:
    """q, k ``[B, T, Hk, Dk]`` (H % Hk == 0), v ``[B, T, H, Dv]``, g, beta ``[B, T, H]``; rows with g = 0 and
    beta = 0 (padding) leave the state as it is. All math in the accumulation dtype, under autocast too.

    ``path`` [B, T, T] bool: path[b, i, j] when row j is row i or one of its ancestors (None: a chain, row j
    <= i). ``reads`` [B, T] long: the row whose state row i reads, on i's path and at or after i (None: i).
    ``pending``: commits not yet written to ``initial_state`` (the rows start from the state with them)."""
    B, T, H, Dv = v.shape
    acc = accum_dtype(v.dtype)
    if initial_state is None:
        initial_state = torch.zeros(B, H, q.shape[-1], Dv, dtype=acc, device=v.device)
    s0 = cast(initial_state, acc)
    # q (pre-scaled) and k stacked along the rows, [B, H, 2T, Dk]: one product with k^T and one with S0 serve
    # both, and S0 is read once as it is (no copy of a state-sized tensor).
    qk = cast(expand_heads(torch.stack([q * scale, k], dim=1), H), acc)  # [B, 2, T, H, Dk]
    qk = qk.permute(0, 3, 1, 2, 4).reshape(B, H, 2 * T, -1)
    kh = qk[:, :, T:]
    vh = cast(v, acc).transpose(1, 2)  # [B, H, T, Dv]
    b = cast(beta, acc).transpose(1, 2).unsqueeze(-1)  # [B, H, T, 1]
    if path is None:
        hidden = _after(T, v.device)
        cum = cast(g, acc).cumsum(1).transpose(1, 2)  # [B, H, T]
    else:
        hidden = ~path.unsqueeze(1)  # [B, 1, T, T]
        cum = (path.unsqueeze(1).to(acc) @ cast(g, acc).transpose(1, 2).unsqueeze(-1)).squeeze(-1)  # G_i on i's path
    # On the path G_i - G_j <= 0, floored (an exponent under EXP_FLOOR is an x86 slow path, exp(-inf) too);
    # off it exactly 0, masked after the exponent (clamped to 0 first: no overflow from j > i).
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).clamp_(EXP_FLOOR, 0.0).exp().masked_fill(hidden, 0.0)
    e_g = cum.exp().unsqueeze(-1)  # [B, H, T, 1]
    dots = bmm4(qk, kh.transpose(-1, -2))  # [B, H, 2T, T]: q_i . k_j, then k_i . k_j
    reads_s0 = bmm4(qk, s0) if pending is None else pending.read(qk, s0)  # [B, H, 2T, Dv]: q_i^T S0, then k_i^T S0
    # A on the strict ancestors: the unit-triangular solve reads neither the diagonal (taken as 1) nor what lies
    # above it, so neither is masked or set (two ops a layer fewer; the same values).
    A = b * decay * dots[:, :, T:]
    u = solve_unit_lower(A, b * torch.addcmul(vh, e_g, reads_s0[:, :, T:], value=-1.0))
    if reads is None:
        decay_at, e_at = decay, e_g
    else:
        at = reads[:, None, :, None].expand(B, H, T, T)
        decay_at, e_at = decay.gather(2, at), e_g.gather(2, at[..., :1])
    o = torch.addcmul(bmm4(dots[:, :, :T] * decay_at, u), e_at, reads_s0[:, :, :T])
    return RowsScan(cast(o.transpose(1, 2), v.dtype), s0, cum, decay, kh, u, pending)
