"""``(I + A) X = R`` for strictly lower triangular ``A``: the gated delta rule's WY solve, in the fast layout.

``torch.linalg.solve_triangular`` hands batches of column-major matrices to LAPACK/MKL: with the right-hand side
on the left (``left=True``) it copies the row-major ``R`` [..., T, D] into that layout first and returns ``X``
column-major, which every later copy or stack of it reads with a stride of T. Solved as the transposed system,
``X^T (I + A)^T = R^T`` (``left=False``), the row-major ``R`` already is the column-major ``R^T`` and the solution
comes back row-major: the same values to rounding, without either copy.

On a CPU the batch of small solves runs on one thread: with two, MKL parallelises each small solve of the batch
on its own (a fork and join per matrix) and the whole takes several times as long. Measured on an AVX-512 EPYC,
16 heads x 128 columns per sequence (a GDN layer of the Qwen3.5-0.8B shape), us per solve:

| rows x sequences | plain, 1 thread | plain, 2 threads | transposed, 1 thread | transposed, 2 threads |
|---|---|---|---|---|
| 7 x 1 (a verify round) | 38 | 97-113 | 14 | 70-73 |
| 7 x 8 | 268-270 | 636-688 | 65-67 | 442-564 |
| 35 x 8 (a prefill's drafting rows) | 3,198-3,217 | 2,328-2,343 | 924-1,141 | 1,272-1,801 |
| 64-row chunks x 8, 256 columns (prefill) | 12,246-12,896 | 6,588-6,645 | 6,246-6,904 | 8,835-10,415 |
"""

from __future__ import annotations

import torch


def solve_unit_lower(A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``X`` with ``(I + A) X = rhs`` for ``A`` [..., T, T] (its diagonal and upper triangle are not read) and
    ``rhs`` [..., T, D]: row-major ``X`` [..., T, D]; gradients as ``solve_triangular``'s. On a CPU, on one
    thread (the caller's thread count is restored after)."""
    if torch.compiler.is_compiling() or A.device.type != "cpu":
        return _solve(A, rhs)  # (a traced thread count would break the graph)
    threads = torch.get_num_threads()
    if threads == 1:
        return _solve(A, rhs)
    torch.set_num_threads(1)
    try:
        return _solve(A, rhs)
    finally:
        torch.set_num_threads(threads)


def _solve(A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve_triangular(A.transpose(-1, -2), rhs.transpose(-1, -2), upper=True, left=False,
                                         unitriangular=True).transpose(-1, -2)
