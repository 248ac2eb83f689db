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


def _tree(clean: int, prefixes: list[int], m: int) -> tuple[list[int], list[int]]:
    """Parents and read rows of [clean chain ; one group of m rows after each clean prefix]."""
    parent = [r - 1 for r in range(clean)]
    reads = list(range(clean))
    for p in prefixes:
        start = len(parent)
        parent += [p - 1] + [start + i for i in range(m - 1)]
        reads += [start + m - 1] * m
    return parent, reads


def _path(parent: list[int], r: int) -> list[int]:
    out = []
    while r >= 0:
        out.append(r)
        r = parent[r]
    return out[::-1]


@pytest.mark.parametrize("clean, prefixes, m", [(4, [1, 2, 3, 4], 3), (1, [1], 3), (3, [0, 3, 2], 2), (2, [2], 1)])
def test_a_tree_of_rows_matches_the_rule_along_each_path(clean, prefixes, m):
    """Noisy groups seeded after different clean prefixes (AR-Trust drafting from every acceptance point): each
    row's output is q_i read from the state at the end of its group, run along its own path only."""
    parent, reads = _tree(clean, prefixes, m)
    T, B, H, dk, dv = len(parent), 2, 2, 8, 5
    q, k, v, g, beta, s0 = _inputs(B, T, 1, H, dk, dv, seed=T)
    path = torch.zeros(B, T, T, dtype=torch.bool)
    for r in range(T):
        path[:, r, _path(parent, r)] = True
    scan = gated_delta_rows(q, k, v, g, beta, s0, dk**-0.5, path=path, reads=torch.tensor([reads] * B))
    for r in range(T):
        rows = _path(parent, reads[r])
        _, state, _ = gated_delta_naive(q[:, rows], k[:, rows], v[:, rows], g[:, rows], beta[:, rows], s0,
                                        return_all_states=True)
        want = dk**-0.5 * torch.einsum("bhk,bhkv->bhv", q[:, r].expand(B, H, dk), state)
        torch.testing.assert_close(scan.o[:, r], want, rtol=1e-10, atol=1e-10)
    # The clean chain's prefix states (what a commit reads) are those of the chain alone.
    _, _, states = gated_delta_naive(q[:, :clean], k[:, :clean], v[:, :clean], g[:, :clean], beta[:, :clean], s0,
                                     return_all_states=True)
    for n in range(1, clean + 1):
        torch.testing.assert_close(scan.state_after(torch.full((B,), n)), states[:, n - 1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_heads", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_commit_in_place_equals_the_new_state_and_keeps_n0_exactly(dtype, chunk_heads, monkeypatch):
    """Also when the state is committed piece by piece (``STATE_CHUNK_BYTES`` of 1 or 3 heads' states, so
    that pieces cross sequences and the last one is short)."""
    if chunk_heads is not None:
        monkeypatch.setattr("flare.ops.gated_delta.rows.STATE_CHUNK_BYTES", chunk_heads * 8 * 6 * dtype.itemsize)
    q, k, v, g, beta, s0 = _inputs(4, 5, 2, 4, 8, 6, seed=3, dtype=dtype)
    n = torch.tensor([0, 5, 2, 0])
    scan = gated_delta_rows(q, k, v, g, beta, s0.clone(), 8**-0.5)
    want = scan.state_after(n)
    before = scan.initial.clone()
    got = scan.state_after(n, in_place=True)
    assert got.data_ptr() == scan.initial.data_ptr()  # written over the old state
    assert torch.equal(got[n == 0], before[n == 0])  # untouched sequences keep their state bit for bit
    torch.testing.assert_close(got, want, rtol=0, atol=0)
