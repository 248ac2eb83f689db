"""The transposed unit-lower solve == ``solve_triangular``'s, values and gradients, and comes back row-major."""

from __future__ import annotations

import pytest
import torch

from flare.ops.triangular import solve_unit_lower


@pytest.mark.parametrize("lead, T, D", [((), 1, 3), ((2,), 5, 1), ((2, 3), 7, 17), ((1, 4, 2), 64, 9)])
def test_the_transposed_solve_equals_the_plain_one(lead, T, D):
    g = torch.Generator().manual_seed(T * 31 + D)
    A = (0.3 * torch.randn(*lead, T, T, generator=g, dtype=torch.float64)).requires_grad_()
    rhs = torch.randn(*lead, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    got = solve_unit_lower(A, rhs)
    want = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.is_contiguous()
    grad = torch.randn(got.shape, generator=g, dtype=torch.float64)
    mine = torch.autograd.grad(got, (A, rhs), grad)
    theirs = torch.autograd.grad(want, (A, rhs), grad)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # The diagonal and upper triangle are not read (taken as I + strict lower part).
    noisy = A.detach() + torch.randn(*lead, T, T, generator=g, dtype=torch.float64).triu()
    torch.testing.assert_close(solve_unit_lower(noisy, rhs.detach()), want.detach(), rtol=1e-12, atol=1e-12)


def test_the_solve_runs_on_one_thread_and_gives_the_threads_back():
    """On a CPU the solve runs on one thread (MKL forks and joins per small matrix on more) and restores the
    caller's thread count, also when it raises."""
    from unittest import mock

    threads = torch.get_num_threads()
    seen = []
    real = torch.linalg.solve_triangular

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    torch.set_num_threads(2)
    try:
        A, rhs = torch.zeros(3, 4, 4), torch.randn(3, 4, 5)
        with mock.patch.object(torch.linalg, "solve_triangular", spy):
            torch.testing.assert_close(solve_unit_lower(A, rhs), rhs)
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            solve_unit_lower(torch.zeros(3, 4, 4), torch.randn(2, 5, 5))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
