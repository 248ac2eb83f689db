"""The gated delta rule over one short run of inference rows, in closed form, with the state after any prefix.

A read-only rows forward (AR-Trust's verify block, a denoising block) runs the recurrence over a few rows from
the committed state S0 and, later, commits the state after an accepted prefix. Stepping row by row costs a
dozen small ops per row; here the whole run is one chunk of the WY form (see ``chunk.py`` for the derivation):

    (I + A) U = diag(beta) (V - diag(e^G) K S0),   A_ij = beta_i e^{G_i - G_j} (k_i . k_j)  (j < i)
    o_i       = scale (e^{G_i} q_i^T S0 + sum_{j<=i} e^{G_i - G_j} (q_i . k_j) u_j)
    S_n       = e^{G_{n-1}} S0 + sum_{j<n} e^{G_{n-1} - G_j} k_j u_j^T      (the state after n rows)

so the outputs, the final state and every prefix state come from a few batched matmuls, and keeping the deltas
U makes a later commit of any prefix one more product (no per-row states are stored).

Rows may also form a tree (``path``): each row continues the recurrence of its ancestors only, e.g. several
noisy groups each seeded after a different clean prefix (AR-Trust drafting from every acceptance point). The
same equations hold with sums over ancestors instead of earlier rows and G_i summed along the row's path; since
ancestors come first, (I + A) stays unit lower triangular. ``reads`` lets a row read the state at another row
of its path (a noisy row reads its group's end state): o_i = scale q_i^T S_{reads(i)}.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from flare.ops.gated_delta.naive import expand_heads
from flare.ops.precision import accum_dtype


class RowsScan(NamedTuple):
    o: torch.Tensor  # [B, T, H, Dv] in v's dtype
    final_state: torch.Tensor  # [B, H, Dk, Dv]
    initial: torch.Tensor  # [B, H, Dk, Dv] S0
    cum: torch.Tensor  # [B, H, T] G_i
    decay: torch.Tensor  # [B, H, T, T] e^{G_i - G_j} on j <= i, else 0
    k: torch.Tensor  # [B, H, T, Dk]
    u: torch.Tensor  # [B, H, T, Dv]

    def state_after(self, n_B: torch.Tensor) -> torch.Tensor:
        """The state after the first n[b] rows of each sequence [B, H, Dk, Dv] (n = 0: the initial state)."""
        B, H, T = self.cum.shape
        at = (n_B - 1).clamp(min=0).view(B, 1, 1, 1).expand(B, H, 1, T)
        row = self.decay.gather(2, at)[:, :, 0]  # [B, H, T]: e^{G_{n-1} - G_j} for j <= n-1, else 0
        g_end = self.cum.gather(2, at[..., 0])  # [B, H, 1]
        state = g_end.exp()[..., None] * self.initial + (self.k * row[..., None]).transpose(-1, -2) @ self.u
        return torch.where((n_B > 0).view(B, 1, 1, 1), state, self.initial)


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
) -> RowsScan:
    """q, k ``[B, T, Hk, Dk]`` (H % Hk == 0), v ``[B, T, H, Dv]``, g, beta ``[B, T, H]``; rows with g = 0 and
    beta = 0 (padding) leave the state as it is. All math in the accumulation dtype.

    ``path`` [B, T, T] bool: path[b, i, j] when row j is row i or one of its ancestors (None: a chain, row j
    <= i). ``reads`` [B, T] long: the row whose state row i reads, on i's path and at or after i (None: i).
    ``final_state`` is the state after the last row of the chain; with a tree, read states through ``reads``."""
    B, T, H, Dv = v.shape
    Dk = q.shape[-1]
    acc = accum_dtype(v.dtype)
    if initial_state is None:
        initial_state = torch.zeros(B, H, Dk, Dv, dtype=acc, device=v.device)
    s0 = initial_state.to(acc)
    qh, kh = (expand_heads(x, H).to(acc).transpose(1, 2) for x in (q, k))  # [B, H, T, Dk]
    vh = v.to(acc).transpose(1, 2)  # [B, H, T, Dv]
    b = beta.to(acc).transpose(1, 2)[..., None]  # [B, H, T, 1]
    if path is None:
        cum = g.to(acc).cumsum(1).transpose(1, 2)  # [B, H, T]
        incl = torch.ones(T, T, dtype=torch.bool, device=v.device).tril()
    else:
        incl = path[:, None]  # [B, 1, T, T]
        cum = (incl.to(acc) @ g.to(acc).transpose(1, 2)[..., None])[..., 0]  # G_i summed along i's path
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~incl, 0.0).exp().masked_fill(~incl, 0.0)
    e_g = cum.exp()[..., None]  # [B, H, T, 1]
    A = b * decay * (kh @ kh.transpose(-1, -2))
    # Strict ancestors only.
    A = A.tril(-1) if path is None else A.masked_fill(torch.eye(T, dtype=torch.bool, device=v.device), 0.0)
    rhs = b * (vh - e_g * (kh @ s0))
    u = torch.linalg.solve_triangular(A + torch.eye(T, dtype=acc, device=v.device), rhs, upper=False,
                                      unitriangular=True)
    if reads is None:
        o = scale * (e_g * (qh @ s0) + ((qh @ kh.transpose(-1, -2)) * decay) @ u)
    else:
        at = reads[:, None, :, None].expand(B, H, T, T)
        decay_at, e_at = decay.gather(2, at), e_g.gather(2, at[..., :1])
        o = scale * (e_at * (qh @ s0) + ((qh @ kh.transpose(-1, -2)) * decay_at) @ u)
    final = cum[..., -1:, None].exp() * s0 + (kh * decay[:, :, -1, :, None]).transpose(-1, -2) @ u
    return RowsScan(o.transpose(1, 2).to(v.dtype), final, s0, cum, decay, kh, u)
