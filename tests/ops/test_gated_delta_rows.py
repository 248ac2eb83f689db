"""The closed-form short-run op against the sequential reference: outputs, final state, every prefix state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flare.ops.gated_delta import gated_delta_naive
from flare.ops.gated_delta.pending import READ_ALL, PendingCommits, reading_all
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
def test_kept_commits_read_and_settle_to_the_new_states(dtype, chunk_heads, monkeypatch):
    """Rounds of rows whose commits are kept as a low-rank update (``pending.py``): every later rows pass reads
    the state they make, and writing them (piece by piece: ``STATE_CHUNK_BYTES`` of 1 or 3 heads' states, so
    pieces cross sequences and the last one is short) gives the state of the sequential rule; sequences that
    commit nothing keep their state bit for bit."""
    if chunk_heads is not None:
        monkeypatch.setattr("flare.ops.gated_delta.pending.STATE_CHUNK_BYTES", chunk_heads * 8 * 6 * dtype.itemsize)
    B, H, dk, dv = 4, 4, 8, 6
    state = _inputs(B, 1, 2, H, dk, dv, seed=0, dtype=dtype)[-1]
    before = state.clone()
    pending = PendingCommits.empty(state, rows=12)
    truth = state.clone()
    counts = [torch.tensor([0, 5, 2, 0]), torch.tensor([0, 3, 5, 0]), torch.tensor([0, 1, 4, 0])]
    for r, n in enumerate(counts):
        q, k, v, g, beta, _ = _inputs(B, 5, 2, H, dk, dv, seed=10 + r, dtype=dtype)
        scan = gated_delta_rows(q, k, v, g, beta, state, dk**-0.5, pending=pending)
        want = gated_delta_rows(q, k, v, g, beta, truth, dk**-0.5)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(scan.o, want.o, rtol=tol, atol=tol)
        truth = want.state_after(n)
        torch.testing.assert_close(scan.state_after(n), truth, rtol=tol, atol=tol)
        if pending.room < 5:
            state = pending.settle(state)
            torch.testing.assert_close(state, want.initial, rtol=tol, atol=tol)
        pending.add(*scan.update_after(n, rows=5))
    written = pending.settle(state)
    assert written.data_ptr() == state.data_ptr() and pending.used == 0  # in place, nothing kept after
    torch.testing.assert_close(written, truth, rtol=tol, atol=tol)
    assert torch.equal(written[[0, 3]], before[[0, 3]])  # untouched sequences keep their state bit for bit


def test_a_narrowed_update_adds_but_only_the_whole_batch_settles():
    B, H, dk, dv = 3, 2, 4, 4
    state = _inputs(B, 1, 2, H, dk, dv, seed=5)[-1]
    pending = PendingCommits.empty(state, rows=8)
    q, k, v, g, beta, _ = _inputs(2, 3, 2, H, dk, dv, seed=6)
    part = pending.narrow(2)
    scan = gated_delta_rows(q, k, v, g, beta, state[:2], 0.5, pending=part)
    n = torch.tensor([3, 1])
    want = torch.cat([scan.state_after(n), state[2:]])  # (read before the update changes)
    part.add(*scan.update_after(n))
    with pytest.raises(RuntimeError, match="whole batch"):
        part.settle(state[:2])
    pending.absorb(part)
    assert (pending.used, pending.span) == (3, 2)
    written = pending.settle(state.clone())
    torch.testing.assert_close(written, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="settle"):  # more rows than it has room for
        pending.add(torch.ones(B, H, 1, 1, dtype=state.dtype), torch.zeros(B, H, 9, dk, dtype=state.dtype),
                    torch.zeros(B, H, 9, dv, dtype=state.dtype))


@pytest.mark.parametrize("flushed", [False, True])
def test_kept_keys_that_decay_to_nothing_are_zeroed_unless_the_cpu_flushes(flushed, monkeypatch):
    """Where denormal floats are not flushed, kept keys and decays below ``TINY`` become zero (their next
    products would be denormal, an x86 slow path each); where the CPU flushes them, nothing is spent on it."""
    from flare.ops import precision

    monkeypatch.setattr(precision, "DENORMALS_FLUSHED", [flushed])
    state = torch.zeros(1, 1, 2, 2, dtype=torch.float32)
    kept = PendingCommits.empty(state, rows=4)
    k = torch.tensor([[[[1.0, 2.0 ** -90]]]])
    kept.add(torch.full((1, 1, 1, 1), 2.0 ** -90), k, torch.ones(1, 1, 1, 2))
    assert kept.k[0, 0, 0, 0] == 1.0 and (kept.k[0, 0, 0, 1] == 0.0) != flushed
    assert (kept.scale.item() == 0.0) != flushed


def test_the_rows_pass_traces_as_one_graph():
    """torch.compile sees the rows pass whole (its kept constants are made in the graph while tracing, where a kept
    tensor would be looked up by identity) and computes what eager does."""
    from flare.ops.precision import constant, faking

    torch.manual_seed(0)
    B, T, H, Dk, Dv = 2, 5, 2, 8, 8
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, Dk), dim=-1) for _ in range(2))
    v, g, beta, s0 = torch.randn(B, T, H, Dv), -torch.rand(B, T, H), torch.rand(B, T, H), torch.randn(B, H, Dk, Dv)

    def f(q, k, v, g, beta, s0):
        assert faking()
        return gated_delta_rows(q, k, v, g, beta, s0, Dk**-0.5).o * constant(2.0, torch.float32, q.device)

    traced = torch.compile(f, backend="eager", fullgraph=True)(q, k, v, g, beta, s0)
    assert not faking()
    torch.testing.assert_close(traced, 2 * gated_delta_rows(q, k, v, g, beta, s0, Dk**-0.5).o)


def test_a_compiled_read_of_kept_commits_equals_the_eager_one():
    """Traced, a read takes every row of the update, so one graph serves every count kept (not a graph each): the
    rows past the kept ones, zero keys even after a settle, add nothing."""
    B, H, dk, dv = 2, 2, 4, 4
    state = _inputs(B, 1, 2, H, dk, dv, seed=7)[-1]
    pending = PendingCommits.empty(state, rows=8)
    graphs = []
    read = torch.compile(lambda x, s: pending.read(x, s), fullgraph=True,
                         backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    x = torch.randn(B, H, 3, dk, generator=torch.Generator().manual_seed(8), dtype=state.dtype)
    for r, n in enumerate([torch.tensor([2, 3]), torch.tensor([0, 3]), torch.tensor([3, 1])]):
        q, k, v, g, beta, _ = _inputs(B, 3, 2, H, dk, dv, seed=20 + r)
        pending.add(*gated_delta_rows(q, k, v, g, beta, state, dk**-0.5, pending=pending).update_after(n, rows=3))
        torch.testing.assert_close(read(x, state), pending.read(x, state), rtol=1e-6, atol=1e-6)
        if r == 1:
            state = pending.settle(state)
            torch.testing.assert_close(read(x, state), pending.read(x, state), rtol=0, atol=0)
    assert len(graphs) == 1  # 3, 6, 0 and 3 rows kept: one graph


def test_a_read_of_every_row_equals_the_read_of_the_kept_ones():
    """``reading_all`` (a CUDA graph's capture and replays) reads the whole update: the same values as a read of
    the kept rows, over counts that grow, after a settle (zero keys) and with nothing kept (exactly)."""
    B, H, dk, dv = 2, 2, 4, 4
    state = _inputs(B, 1, 2, H, dk, dv, seed=9)[-1]
    pending = PendingCommits.empty(state, rows=8)
    x = torch.randn(B, H, 3, dk, generator=torch.Generator().manual_seed(10), dtype=state.dtype)

    def whole():
        with reading_all():
            assert READ_ALL[0]
            return pending.read(x, state)

    torch.testing.assert_close(whole(), pending.read(x, state), rtol=0, atol=0)
    for r, n in enumerate([torch.tensor([2, 3]), torch.tensor([0, 3]), torch.tensor([3, 1])]):
        q, k, v, g, beta, _ = _inputs(B, 3, 2, H, dk, dv, seed=30 + r)
        pending.add(*gated_delta_rows(q, k, v, g, beta, state, dk**-0.5, pending=pending).update_after(n, rows=3))
        torch.testing.assert_close(whole(), pending.read(x, state), rtol=1e-6, atol=1e-6)
        if r == 1:
            state = pending.settle(state)
            torch.testing.assert_close(whole(), pending.read(x, state), rtol=0, atol=0)
    assert not READ_ALL[0]  # restored on leaving
