"""Tests for flare.ops.gated_delta (naive vs chunked vs transformers' oracles)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flare.ops.gated_delta import gated_delta, gated_delta_chunk, gated_delta_naive

B, H, DK, DV = 2, 3, 8, 16
TS = [1, 63, 64, 200]


def make_inputs(T, dk=DK, dv=DV, with_state=False, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=gen)

    q = F.normalize(rn(B, T, H, dk), dim=-1)
    k = F.normalize(rn(B, T, H, dk), dim=-1)
    v = rn(B, T, H, dv)
    g = -F.softplus(rn(B, T, H))
    beta = torch.sigmoid(rn(B, T, H))
    s0 = rn(B, H, dk, dv) if with_state else None
    xs = [q, k, v, g, beta, s0]
    if requires_grad:
        xs = [x.clone().requires_grad_(True) if x is not None else None for x in xs]
    return xs


def assert_close(actual, expected, tol=1e-5, what=""):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if expected.numel() == 0:
        return
    err = (actual - expected).abs().max().item()
    ref = expected.abs().max().item()
    assert err <= tol * max(ref, 1.0), f"{what}: max abs diff {err:.3e} vs max abs {ref:.3e}"


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", TS)
def test_chunk_matches_naive(T, with_state):
    q, k, v, g, beta, s0 = make_inputs(T, with_state=with_state, seed=T)
    o_n, s_n = gated_delta_naive(q, k, v, g, beta, s0)
    o_c, s_c = gated_delta_chunk(q, k, v, g, beta, s0)
    assert o_n.shape == (B, T, H, DV) and s_n.shape == (B, H, DK, DV)
    assert s_n.dtype == s_c.dtype == torch.float32
    assert_close(o_c, o_n, what="o")
    assert_close(s_c, s_n, what="state")


@pytest.mark.parametrize(
    "T,dk,dv,chunk_size", [(37, 8, 16, 16), (100, 16, 8, 64), (37, 16, 8, 16), (64, 8, 16, 1)]
)
def test_chunk_matches_naive_shapes_and_chunk_sizes(T, dk, dv, chunk_size):
    q, k, v, g, beta, s0 = make_inputs(T, dk, dv, with_state=True, seed=7)
    o_n, s_n = gated_delta_naive(q, k, v, g, beta, s0, scale=0.3)
    o_c, s_c = gated_delta_chunk(q, k, v, g, beta, s0, scale=0.3, chunk_size=chunk_size)
    assert o_c.shape == (B, T, H, dv) and s_c.shape == (B, H, dk, dv)
    assert_close(o_c, o_n, what="o")
    assert_close(s_c, s_n, what="state")


@pytest.mark.parametrize("T", TS)
def test_gradients_chunk_match_naive(T):
    grads = {}
    for name, fn in (("naive", gated_delta_naive), ("chunk", gated_delta_chunk)):
        xs = make_inputs(T, with_state=True, seed=100 + T, requires_grad=True)
        o, s = fn(*xs)
        gen = torch.Generator().manual_seed(1)
        go, gs = torch.randn(o.shape, generator=gen), torch.randn(s.shape, generator=gen)
        ((o * go).sum() + (s * gs).sum()).backward()
        grads[name] = [x.grad for x in xs]
    for label, gn, gc in zip(("q", "k", "v", "g", "beta", "initial_state"), *grads.values()):
        assert gn is not None and gc is not None, label
        assert_close(gc, gn, tol=2e-5, what=f"grad {label}")


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [1, 63, 200])
def test_matches_transformers_oracles(T, with_state):
    mod = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    q, k, v, g, beta, s0 = make_inputs(T, with_state=with_state, seed=50 + T)
    kw = dict(initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=False)
    o_rec, s_rec = mod.torch_recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    o_chk, s_chk = mod.torch_chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    o_n, s_n = gated_delta_naive(q, k, v, g, beta, s0)
    o_c, s_c = gated_delta_chunk(q, k, v, g, beta, s0)
    for name, (o, s) in (("naive", (o_n, s_n)), ("chunk", (o_c, s_c))):
        assert_close(o, o_rec, what=f"{name} o vs recurrent oracle")
        assert_close(s, s_rec, what=f"{name} state vs recurrent oracle")
        assert_close(o, o_chk, what=f"{name} o vs chunk oracle")
        assert_close(s, s_chk, what=f"{name} state vs chunk oracle")


def test_return_all_states():
    T = 9
    q, k, v, g, beta, s0 = make_inputs(T, with_state=True, seed=3)
    o, s, all_states = gated_delta_naive(q, k, v, g, beta, s0, return_all_states=True)
    assert all_states.shape == (B, T, H, DK, DV) and all_states.dtype == torch.float32
    assert torch.equal(all_states[:, -1], s)
    for t in range(T):
        _, s_t = gated_delta_naive(q[:, : t + 1], k[:, : t + 1], v[:, : t + 1],
                                   g[:, : t + 1], beta[:, : t + 1], s0)
        assert_close(all_states[:, t], s_t, tol=1e-6, what=f"state {t}")


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("fn", [gated_delta_naive, gated_delta_chunk])
def test_empty_sequence(fn, with_state):
    q, k, v, g, beta, s0 = make_inputs(0, with_state=with_state)
    o, s = fn(q, k, v, g, beta, s0)
    assert o.shape == (B, 0, H, DV) and o.dtype == v.dtype
    expected = s0 if with_state else torch.zeros(B, H, DK, DV)
    assert s.dtype == torch.float32 and torch.equal(s, expected)
    if with_state:
        assert s.data_ptr() != s0.data_ptr()  # no aliasing of the caller's state
    if fn is gated_delta_naive:
        _, _, all_states = fn(q, k, v, g, beta, s0, return_all_states=True)
        assert all_states.shape == (B, 0, H, DK, DV)


def test_output_dtype_follows_v():
    q, k, v, g, beta, s0 = make_inputs(20, with_state=True)
    for fn in (gated_delta_naive, gated_delta_chunk):
        o, s = fn(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, s0.bfloat16())
        assert o.dtype == torch.bfloat16 and s.dtype == torch.float32


@pytest.mark.parametrize("T,expected", [(0, "naive"), (1, "step"), (2, "naive"), (16, "naive"), (17, "chunk")])
def test_selector_picks_form(T, expected):
    xs = make_inputs(T, with_state=True)
    o, s, name = gated_delta(*xs)
    assert name == expected
    ref_o, ref_s = gated_delta_naive(*xs)
    assert_close(o, ref_o, what="o")
    assert_close(s, ref_s, what="state")


@pytest.mark.parametrize("T,chunk", [(17, 32), (30, 32), (32, 32), (33, 64), (64, 64), (100, 64), (200, 32),
                                     (1000, 64), (4000, 32)])
def test_dispatch_chunks_pad_least(T, chunk, monkeypatch):
    """The chunk form runs in the chunk size that pads T least (64 on a tie), and equals the naive form."""
    from flare.ops import gated_delta as module
    from flare.ops.gated_delta.chunk import chunk_size_for

    assert chunk_size_for(T) == chunk
    if T > 200:
        return
    seen = []

    def spy(*args):
        seen.append(args[-1])
        return gated_delta_chunk(*args)

    monkeypatch.setattr(module, "gated_delta_chunk", spy)
    xs = make_inputs(T, with_state=True)
    o, s, name = gated_delta(*xs)
    assert name == "chunk" and seen == [chunk]
    ref_o, ref_s = gated_delta_naive(*xs)
    assert_close(o, ref_o, what="o")
    assert_close(s, ref_s, what="state")


def test_selector_override_and_bad_prefer():
    xs = make_inputs(4)
    assert gated_delta(*xs, prefer="chunk")[2] == "chunk"
    xs = make_inputs(40)
    assert gated_delta(*xs, prefer="naive")[2] == "naive"
    for bad in ("fast", "Naive", ""):
        with pytest.raises(ValueError, match="prefer"):
            gated_delta(*xs, prefer=bad)
    with pytest.raises(ValueError, match="step"):
        gated_delta(*xs, prefer="step")


@pytest.mark.parametrize("form", ["step", "naive", "chunk"])
@pytest.mark.parametrize("with_state", [False, True])
def test_grouped_heads_equal_repeated_heads(form, with_state):
    """q/k with fewer heads than v (GDN's grouped layout) == the same heads repeated, in every form."""
    T = 1 if form == "step" else 37
    q, k, v, g, beta, s0 = make_inputs(T, with_state=with_state)
    q6, k6, v6 = q.repeat(1, 1, 2, 1), k.repeat(1, 1, 2, 1), torch.cat([v, v.flip(2)], 2)
    g6, b6 = torch.cat([g, g.flip(2)], 2), torch.cat([beta, beta.flip(2)], 2)
    s6 = torch.cat([s0, s0.flip(1)], 1) if with_state else None
    # Grouped: 3 q/k heads serve 6 value heads, head h -> q/k head h // 2.
    qg, kg = q6[:, :, ::2], k6[:, :, ::2]
    qe, ke = qg.repeat_interleave(2, dim=2), kg.repeat_interleave(2, dim=2)
    o, s, name = gated_delta(qg, kg, v6, g6, b6, s6, prefer=form)
    ref_o, ref_s = gated_delta_naive(qe, ke, v6, g6, b6, s6)
    assert name == form
    assert_close(o, ref_o, what="o")
    assert_close(s, ref_s, what="state")


@pytest.mark.parametrize("dk,dv", [(8, 16), (32, 64)])  # both ways of reading the state (SMALL_STATE)
@pytest.mark.parametrize("with_state", [False, True])
def test_step_matches_naive_small_and_large_states(dk, dv, with_state):
    from flare.ops.gated_delta.step import SMALL_STATE

    assert (dk * dv <= SMALL_STATE) == (dk == 8)
    xs = make_inputs(1, dk=dk, dv=dv, with_state=with_state, seed=dk)
    o, s, name = gated_delta(*xs, prefer="step")
    ref_o, ref_s = gated_delta_naive(*xs)
    assert_close(o, ref_o, what="o")
    assert_close(s, ref_s, what="state")


@pytest.mark.parametrize("dk,dv", [(8, 16), (32, 64)])
def test_step_in_place_writes_the_same_state_over_the_old_one(dk, dv):
    """``in_place`` returns the given state tensor holding what the out-of-place step returns; a padding row
    (g = 0, beta = 0) leaves it bit for bit; a state it cannot own (non-contiguous) is left untouched."""
    q, k, v, g, beta, s0 = make_inputs(1, dk=dk, dv=dv, with_state=True, seed=3)
    g[1], beta[1] = 0.0, 0.0  # sequence 1 is a padding row
    ref_o, ref_s, _ = gated_delta(q, k, v, g, beta, s0, prefer="step")
    state = s0.clone()
    o, s, _ = gated_delta(q, k, v, g, beta, state, prefer="step", in_place=True)
    assert s.data_ptr() == state.data_ptr()
    assert torch.equal(o, ref_o) and torch.equal(s, ref_s)
    assert torch.equal(s[1], s0[1])
    strided = s0.transpose(-1, -2).contiguous().transpose(-1, -2)
    kept = strided.clone()
    _, s2, _ = gated_delta(q, k, v, g, beta, strided, prefer="step", in_place=True)
    assert torch.equal(strided, kept)
    assert_close(s2, ref_s, what="state from a strided one")


def test_step_gradients_match_naive():
    xs = make_inputs(1, with_state=True, requires_grad=True)
    o, s, _ = gated_delta(*xs, prefer="step")
    xr = [x.detach().clone().requires_grad_(True) for x in xs]
    ro, rs = gated_delta_naive(*xr)
    up_o, up_s = torch.randn_like(o), torch.randn_like(s)
    (o * up_o).sum().add((s * up_s).sum()).backward()
    (ro * up_o).sum().add((rs * up_s).sum()).backward()
    for a, b in zip(xs, xr):
        assert_close(a.grad, b.grad, what="grad")


def _bad_shape_cases():
    q, k, v, g, beta, s0 = make_inputs(5, with_state=True)
    return [
        ("q", (q[0], k, v, g, beta, s0)),
        ("k", (q, k[:, :4], v, g, beta, s0)),
        ("k", (q, k[..., :4], v, g, beta, s0)),
        ("v", (q, k, v[:1], g, beta, s0)),
        ("v", (q, k, v[:, :, :2], g, beta, s0)),  # 2 value heads cannot share 3 q/k heads
        ("v", (q, k, v[..., None], g, beta, s0)),
        ("g", (q, k, v, g[:, :, :2], beta, s0)),
        ("g", (q, k, v, g[..., None], beta, s0)),
        ("beta", (q, k, v, g, beta[:, :3], s0)),
        ("initial_state", (q, k, v, g, beta, s0[..., :4])),
        ("initial_state", (q, k, v, g, beta, s0[0])),
    ]


@pytest.mark.parametrize("fn", [gated_delta, gated_delta_naive, gated_delta_chunk])
def test_bad_shapes_raise(fn):
    for name, args in _bad_shape_cases():
        with pytest.raises(ValueError, match=rf"^{name} "):
            fn(*args)


def test_bad_chunk_size_raises():
    xs = make_inputs(5)
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_chunk(*xs, chunk_size=0)


@pytest.mark.parametrize("T", [7, 40])
def test_fast_forgetting_heads_match_naive(T):
    """Decays far below EXP_FLOOR (g of -30 a row: e^(G_i - G_j) down to e^-1170) are floored in the chunked and
    rows forms, which still equal the sequential form."""
    from flare.ops.gated_delta import gated_delta_rows

    q, k, v, g, beta, s0 = make_inputs(T, with_state=True, seed=3)
    g = g * 30
    ref_o, ref_s = gated_delta_naive(q, k, v, g, beta, s0)
    o, s = gated_delta_chunk(q, k, v, g, beta, s0)
    assert_close(o, ref_o, what="chunk o")
    assert_close(s, ref_s, what="chunk state")
    scan = gated_delta_rows(q, k, v, g, beta, s0, DK**-0.5)
    assert_close(scan.o, ref_o, what="rows o")
    assert_close(scan.final_state, ref_s, what="rows state")
