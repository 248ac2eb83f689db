"""The closed-form short-run op against the sequential reference: outputs, final state, every prefix state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flare.ops.gated_delta import gated_delta_naive
from flare.ops.gated_delta.rows import gated_delta_rows


def _inputs(B, T, Hk, H, dk, dv, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q, k = F.normalize(rn(B, T, Hk, dk), dim=-1), F.normalize(rn(B, T, Hk, dk), dim=-1)
    v, g, beta = rn(B, T, H, dv), -F.softplus(rn(B, T, H)), torch.sigmoid(rn(B, T, H))
    return q, k, v, g, beta, rn(B, H, dk, dv)


@pytest.mark.parametrize("T", [1, 2, 3, 5, 7, 9, 16, 33])
@pytest.mark.parametrize("Hk, H", [(2, 2), (1, 3), (2, 4)])
def test_matches_the_sequential_rule(T, Hk, H):
    q, k, v, g, beta, s0 = _inputs(3, T, Hk, H, 8, 5, seed=T * 10 + H)
    o_ref, final_ref, states = gated_delta_naive(q, k, v, g, beta, s0, return_all_states=True)
    scan = gated_delta_rows(q, k, v, g, beta, s0, 8**-0.5)
    torch.testing.assert_close(scan.o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scan.final_state, final_ref, rtol=1e-10, atol=1e-10)
    for n in range(T + 1):
        want = s0 if n == 0 else states[:, n - 1]
        torch.testing.assert_close(scan.state_after(torch.full((3,), n)), want, rtol=1e-10, atol=1e-10)
    # A different prefix per sequence.
    n = torch.tensor([0, T, (T + 1) // 2])
    got = scan.state_after(n)
    for b in range(3):
        want = s0[b] if n[b] == 0 else states[b, n[b] - 1]
        torch.testing.assert_close(got[b], want, rtol=1e-10, atol=1e-10)


def test_padding_rows_leave_the_state_alone_and_fp32_is_close():
    q, k, v, g, beta, s0 = _inputs(2, 6, 2, 2, 4, 4, seed=1, dtype=torch.float32)
    live = (torch.arange(6) < torch.tensor([3, 6])[:, None])[..., None]
    scan = gated_delta_rows(q, k, v, g * live, beta * live, s0, 0.5)
    _, final, _ = gated_delta_naive(q[:1, :3], k[:1, :3], v[:1, :3], g[:1, :3], beta[:1, :3], s0[:1],
                                    return_all_states=True)
    torch.testing.assert_close(scan.final_state[:1], final, rtol=1e-5, atol=1e-5)
    assert scan.o.dtype == torch.float32 and scan.final_state.dtype == torch.float32
    torch.testing.assert_close(scan.state_after(torch.tensor([6, 6]))[:1], final, rtol=1e-5, atol=1e-5)
