"""Tests for the two-stream gated delta op (flare.ops.gated_delta.two_stream) and chunk block states."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flare.ops.gated_delta import (
    gated_delta_chunk,
    gated_delta_naive,
    gated_delta_two_stream,
    gated_delta_two_stream_reference,
)
from flare.ops.gated_delta.two_stream import _inverse_unit_lower

S, DK, DV = 2, 8, 16
GROUPED, EQUAL = (2, 4), (4, 4)  # (Hk, H)
FNS = {"efficient": gated_delta_two_stream, "reference": gated_delta_two_stream_reference}
NAMES = ("q_c", "k_c", "v_c", "g_c", "beta_c", "q_n", "k_n", "v_n", "g_n", "beta_n")


def make_inputs(T, V=2, heads=GROUPED, seed=0, dtype=torch.float32, requires_grad=False):
    """Ten tensors (clean then noisy) in the op's order: unit q/k, g <= 0, beta in (0, 1)."""
    Hk, H = heads
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    xs = []
    for lead in ((S,), (S, V)):
        xs += [
            F.normalize(rn(*lead, T, Hk, DK), dim=-1),
            F.normalize(rn(*lead, T, Hk, DK), dim=-1),
            rn(*lead, T, H, DV),
            -F.softplus(rn(*lead, T, H)),
            torch.sigmoid(rn(*lead, T, H)),
        ]
    if requires_grad:
        xs = [x.clone().requires_grad_(True) for x in xs]
    return xs


def assert_close(actual, expected, tol=1e-5, what=""):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    if expected.numel() == 0:
        return
    err = (actual - expected).abs().max().item()
    ref = expected.abs().max().item()
    assert err <= tol * max(ref, 1.0), f"{what}: max abs diff {err:.3e} vs max abs {ref:.3e}"


def blocks_of(T, bs):
    return [(lo, min(lo + bs, T)) for lo in range(0, T, bs)]


# ---------------------------------------------------------------------------------------------- efficient == reference


@pytest.mark.parametrize("T", [1, 5, 37, 130])
@pytest.mark.parametrize("bs", [1, 3, 4, 7])
def test_efficient_matches_reference(bs, T):
    for V, heads in ((1, GROUPED), (2, EQUAL), (2, GROUPED)):
        xs = make_inputs(T, V, heads, seed=1000 * bs + T + V)
        for readout in ("token", "block"):
            o_c, o_n = gated_delta_two_stream(*xs, bs, clean_readout=readout)
            r_c, r_n = gated_delta_two_stream_reference(*xs, bs, clean_readout=readout)
            H = heads[1]
            assert o_c.shape == (S, T, H, DV) and o_n.shape == (S, V, T, H, DV)
            what = f"bs={bs} T={T} V={V} heads={heads} {readout}"
            assert_close(o_c, r_c, what=f"o_c {what}")
            assert_close(o_n, r_n, what=f"o_n {what}")


@pytest.mark.parametrize("T,bs", [(37, 20), (130, 64), (130, 100), (200, 9)])
def test_efficient_matches_reference_large_blocks(T, bs):
    """Blocks above NEUMANN_MAX_BLOCK (triangular solve), a whole chunk, longer than the default chunk."""
    xs = make_inputs(T, 2, GROUPED, seed=T + bs)
    for readout in ("token", "block"):
        o_c, o_n = gated_delta_two_stream(*xs, bs, clean_readout=readout)
        r_c, r_n = gated_delta_two_stream_reference(*xs, bs, clean_readout=readout)
        assert_close(o_c, r_c, what=f"o_c {readout}")
        assert_close(o_n, r_n, what=f"o_n {readout}")


@pytest.mark.parametrize("L", [1, 2, 3, 4, 5, 8, 9, 16])
def test_inverse_unit_lower(L):
    gen = torch.Generator().manual_seed(L)
    A = (torch.randn(3, L, L, generator=gen, dtype=torch.float64) * 0.5).tril(-1)
    inv = _inverse_unit_lower(A)
    assert_close(inv, torch.linalg.inv(torch.eye(L, dtype=torch.float64) + A), tol=1e-12, what=f"L={L}")


@pytest.mark.parametrize("readout", ["token", "block"])
def test_efficient_matches_reference_float64(readout):
    xs = make_inputs(37, 2, GROUPED, seed=5, dtype=torch.float64)
    o_c, o_n = gated_delta_two_stream(*xs, 3, clean_readout=readout, scale=0.7)
    r_c, r_n = gated_delta_two_stream_reference(*xs, 3, clean_readout=readout, scale=0.7)
    assert o_c.dtype == o_n.dtype == torch.float64
    assert_close(o_c, r_c, tol=1e-10, what="o_c")
    assert_close(o_n, r_n, tol=1e-10, what="o_n")


def test_default_scale_and_low_precision_dtype():
    xs = make_inputs(9, 2, GROUPED, seed=6)
    o_c, o_n = gated_delta_two_stream(*xs, 4)
    s_c, s_n = gated_delta_two_stream(*xs, 4, scale=DK**-0.5)
    assert torch.equal(o_c, s_c) and torch.equal(o_n, s_n)
    low = [x.bfloat16() if x.ndim >= 4 else x for x in xs]  # q, k, v in bf16; g, beta stay fp32
    for fn in FNS.values():
        b_c, b_n = fn(*low, 4)
        assert b_c.dtype == b_n.dtype == torch.bfloat16
        assert_close(b_c.float(), o_c, tol=5e-2, what="bf16 o_c")
        assert_close(b_n.float(), o_n, tol=5e-2, what="bf16 o_n")


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
def test_empty_sequence(fn):
    xs = make_inputs(0, 2, GROUPED)
    o_c, o_n = fn(*xs, 4)
    assert o_c.shape == (S, 0, 4, DV) and o_n.shape == (S, 2, 0, 4, DV)


# ------------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "T,bs,V,heads,readout",
    [
        (37, 4, 2, GROUPED, "token"),
        (13, 3, 1, EQUAL, "block"),
        (5, 7, 2, GROUPED, "token"),
        (20, 1, 1, GROUPED, "block"),
        (70, 12, 2, GROUPED, "block"),  # block > NEUMANN_MAX_BLOCK: triangular-solve path
    ],
)
def test_gradients_match_reference(T, bs, V, heads, readout):
    grads = {}
    for name, fn in FNS.items():
        xs = make_inputs(T, V, heads, seed=T + bs, requires_grad=True)
        o_c, o_n = fn(*xs, bs, clean_readout=readout)
        gen = torch.Generator().manual_seed(1)
        up_c, up_n = torch.randn(o_c.shape, generator=gen), torch.randn(o_n.shape, generator=gen)
        ((o_c * up_c).sum() + (o_n * up_n).sum()).backward()
        grads[name] = [x.grad for x in xs]
    for label, ge, gr in zip(NAMES, grads["efficient"], grads["reference"]):
        assert ge is not None and gr is not None, label
        assert_close(ge, gr, tol=2e-5, what=f"grad {label}")


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
def test_noisy_loss_reaches_clean_stream_through_seeded_states(fn):
    """Only o_n gets an upstream gradient: clean k/v/g/beta still get one (via the seeded states), except at
    positions of the last block, which seed nothing; q_c gets none."""
    T, bs = 11, 4  # blocks [0, 4), [4, 8), [8, 11)
    xs = make_inputs(T, 2, GROUPED, seed=3, requires_grad=True)
    _, o_n = fn(*xs, bs)
    (o_n * torch.randn(o_n.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    q_c, k_c, v_c, g_c, beta_c = xs[:5]
    assert q_c.grad is None or torch.count_nonzero(q_c.grad) == 0
    for name, x in (("k_c", k_c), ("v_c", v_c), ("g_c", g_c), ("beta_c", beta_c)):
        assert x.grad is not None, name
        per_pos = x.grad.abs().flatten(2).sum(-1)  # [S, T]
        first = 1 if name == "g_c" else 0  # g at position 0 decays the zero state: no effect at all
        assert (per_pos[:, first:8] > 0).all(), f"{name}: seeding positions must get a gradient"
        assert torch.count_nonzero(per_pos[:, 8:]) == 0, f"{name}: the last block seeds no noisy block"


def test_gradients_float64_tight():
    grads = {}
    for name, fn in FNS.items():
        xs = make_inputs(10, 2, GROUPED, seed=8, dtype=torch.float64, requires_grad=True)
        o_c, o_n = fn(*xs, 3)
        (o_c.sin().sum() + o_n.cos().sum()).backward()
        grads[name] = [x.grad for x in xs]
    for label, ge, gr in zip(NAMES, grads["efficient"], grads["reference"]):
        assert_close(ge, gr, tol=1e-10, what=f"grad {label}")


# -------------------------------------------------------------------------- properties by construction (both forms)


def perturbed(xs, index, where):
    """Copy of xs with tensor ``index`` changed at ``where`` (a tuple of slices)."""
    out = [x.clone() for x in xs]
    x = out[index]
    bump = torch.randn(x[where].shape, generator=torch.Generator().manual_seed(index), dtype=x.dtype)
    if NAMES[index].startswith(("g_", "beta_")):
        x[where] = torch.sigmoid(bump) * (-1.0 if NAMES[index].startswith("g_") else 1.0)
    else:
        x[where] = bump
    return out


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
def test_clean_future_does_not_reach_noisy_block(fn):
    T, bs = 14, 3
    xs = make_inputs(T, 2, GROUPED, seed=11)
    _, base = fn(*xs, bs)
    for b in range(1, len(blocks_of(T, bs))):
        cut = b * bs
        for i in range(5):  # every clean tensor, positions >= b * bs
            _, o_n = fn(*perturbed(xs, i, (slice(None), slice(cut, None))), bs)
            assert_close(o_n[:, :, : cut + bs], base[:, :, : cut + bs], tol=1e-6, what=f"{NAMES[i]} b={b}")
            if i != 0 and cut + bs < T:  # the perturbation is live: later blocks do see it
                assert (o_n[:, :, cut + bs :] - base[:, :, cut + bs :]).abs().max() > 1e-4, NAMES[i]


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
def test_noisy_state_does_not_leak_between_blocks_or_views(fn):
    T, bs, V = 13, 4, 2
    xs = make_inputs(T, V, GROUPED, seed=12)
    _, base = fn(*xs, bs)
    for lo, hi in blocks_of(T, bs):
        for i in range(5, 10):
            _, o_n = fn(*perturbed(xs, i, (slice(None), 0, slice(lo, hi))), bs)  # view 0, this block only
            changed = torch.zeros(T, dtype=torch.bool)
            changed[lo:hi] = True
            assert_close(o_n[:, 1], base[:, 1], tol=1e-6, what=f"other view, {NAMES[i]} [{lo}, {hi})")
            assert_close(o_n[:, 0, ~changed], base[:, 0, ~changed], tol=1e-6, what=f"other blocks, {NAMES[i]}")
            assert (o_n[:, 0, lo:hi] - base[:, 0, lo:hi]).abs().max() > 1e-4, NAMES[i]


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
def test_noisy_block_is_bidirectional(fn):
    """Every position of a noisy block reads the block-END state: a change at the block's last noisy position
    moves the outputs of all its positions."""
    T, bs = 8, 4
    xs = make_inputs(T, 1, GROUPED, seed=13)
    _, base = fn(*xs, bs)
    _, o_n = fn(*perturbed(xs, 7, (slice(None), 0, slice(3, 4))), bs)  # v_n at position 3 (end of block 0)
    assert ((o_n[:, 0, :4] - base[:, 0, :4]).abs().flatten(2).amax(-1) > 1e-4).all()
    assert_close(o_n[:, 0, 4:], base[:, 0, 4:], tol=1e-6, what="block 1")


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
def test_clean_stream_is_causal(fn):
    T, bs = 13, 4
    xs = make_inputs(T, 1, GROUPED, seed=14)
    base_tok, _ = fn(*xs, bs, clean_readout="token")
    base_blk, _ = fn(*xs, bs, clean_readout="block")
    for p in (0, 5, 8, 12):
        for i in range(5):
            ys = perturbed(xs, i, (slice(None), slice(p, p + 1)))
            o_tok, _ = fn(*ys, bs, clean_readout="token")
            assert_close(o_tok[:, :p], base_tok[:, :p], tol=1e-6, what=f"token, {NAMES[i]} at {p}")
            if (i, p) == (3, 0):
                continue  # g at position 0 only decays the zero state: no effect to detect
            assert (o_tok[:, p:] - base_tok[:, p:]).abs().max() > 1e-4, NAMES[i]
            o_blk, _ = fn(*ys, bs, clean_readout="block")
            start = p // bs * bs  # block readout: the whole block of p may move, earlier blocks may not
            assert_close(o_blk[:, :start], base_blk[:, :start], tol=1e-6, what=f"block, {NAMES[i]} at {p}")
            assert (o_blk[:, start : p + 1] - base_blk[:, start : p + 1]).abs().max() > 1e-4, NAMES[i]


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
@pytest.mark.parametrize("bs", [1, 3, 4])
def test_noisy_equal_to_clean_matches_block_readout(fn, bs):
    T, V = 11, 2
    xs = make_inputs(T, V, GROUPED, seed=15)
    clean = xs[:5]
    noisy = [x[:, None].expand(x.shape[0], V, *x.shape[1:]).contiguous() for x in clean]
    o_c, o_n = fn(*clean, *noisy, bs, clean_readout="block")
    for v in range(V):
        assert_close(o_n[:, v], o_c, tol=1e-5, what=f"view {v}")
    # Token readout: the last position of every block reads the same state in both streams.
    o_tok, _ = fn(*clean, *noisy, bs, clean_readout="token")
    ends = [hi - 1 for _, hi in blocks_of(T, bs)]
    assert_close(o_n[:, 0, ends], o_tok[:, ends], tol=1e-5, what="block ends")


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
def test_padding_positions_change_nothing(fn):
    """The caller pads segments with g = 0, beta = 0 (any q, k, v): real positions' outputs stay as they were,
    also in a block that the padding completes (its block-end state is unchanged)."""
    T, pad, bs = 10, 5, 4  # pads block [8, 12) and adds block [12, 15)
    xs = make_inputs(T, 2, GROUPED, seed=17)
    junk = make_inputs(pad, 2, GROUPED, seed=18)
    padded = []
    for i, (x, y) in enumerate(zip(xs, junk)):
        if NAMES[i].startswith(("g_", "beta_")):
            y = torch.zeros_like(y)
        padded.append(torch.cat([x, y], dim=1 if i < 5 else 2))
    for readout in ("token", "block"):
        o_c, o_n = fn(*xs, bs, clean_readout=readout)
        p_c, p_n = fn(*padded, bs, clean_readout=readout)
        assert_close(p_c[:, :T], o_c, tol=1e-6, what=f"o_c {readout}")
        assert_close(p_n[:, :, :T], o_n, tol=1e-6, what=f"o_n {readout}")


def test_reference_matches_concatenated_definition():
    """Independent of the reference's state plumbing: noisy block b == a plain recurrence over
    clean[:b*bs] ++ noisy block, whose final state every block position reads."""
    T, bs, V = 10, 4, 2
    xs = make_inputs(T, V, GROUPED, seed=16)
    H = GROUPED[1]
    _, r_n = gated_delta_two_stream_reference(*xs, bs)
    for s in range(S):
        for v in range(V):
            for lo, hi in blocks_of(T, bs):
                seq = [torch.cat([c[s : s + 1, :lo], n[s : s + 1, v, lo:hi]], 1) for c, n in zip(xs[:5], xs[5:])]
                _, state = gated_delta_naive(*seq)
                q = seq[0][0, lo:].repeat_interleave(H // GROUPED[0], dim=1)  # [L, H, Dk]
                expected = torch.einsum("lhk,hkv->lhv", q, state[0]) * DK**-0.5
                assert_close(r_n[s, v, lo:hi], expected, tol=1e-6, what=f"s={s} v={v} [{lo}, {hi})")


# ------------------------------------------------------------------------------------- gated_delta_chunk block states


def chunk_inputs(T, with_state, seed=0, dtype=torch.float32, requires_grad=False):
    xs = make_inputs(T, 1, GROUPED, seed=seed, dtype=dtype)[:5]
    gen = torch.Generator().manual_seed(seed + 1)
    xs.append(torch.randn(S, GROUPED[1], DK, DV, generator=gen).to(dtype) if with_state else None)
    if requires_grad:
        xs = [x.requires_grad_(True) if x is not None else None for x in xs]
    return xs


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [1, 5, 37, 130])
def test_chunk_block_states_match_naive(T, with_state):
    q, k, v, g, beta, s0 = chunk_inputs(T, with_state, seed=T)
    o_ref, s_ref, all_states = gated_delta_naive(q, k, v, g, beta, s0, return_all_states=True)
    plain = gated_delta_chunk(q, k, v, g, beta, s0)
    assert len(plain) == 2  # without block_states: the old (o, final_state) contract
    for bs, chunk_size in ((1, 64), (3, 64), (4, 64), (7, 16), (64, 64), (100, 64), (5, 3)):
        o, final, blk = gated_delta_chunk(q, k, v, g, beta, s0, chunk_size=chunk_size, block_states=bs)
        ends = [hi - 1 for _, hi in blocks_of(T, bs)]
        assert blk.shape == (S, -(-T // bs), GROUPED[1], DK, DV) and blk.dtype == torch.float32
        assert_close(blk, all_states[:, ends], what=f"block states bs={bs}")
        assert torch.equal(blk[:, -1], final), "last (possibly partial) block ends in the final state"
        assert_close(o, o_ref, what=f"o bs={bs}")
        assert_close(final, s_ref, what=f"final state bs={bs}")
        if chunk_size % bs == 0:  # same chunking: identical to the call without block states
            o_plain, s_plain = gated_delta_chunk(q, k, v, g, beta, s0, chunk_size=chunk_size)
            assert torch.equal(o, o_plain) and torch.equal(final, s_plain)


def test_chunk_block_states_float64_and_gradients():
    xs = chunk_inputs(45, True, seed=4, dtype=torch.float64, requires_grad=True)
    _, _, all_states = gated_delta_naive(*xs, return_all_states=True)
    ref = all_states[:, 3::4]  # bs = 4: ends 3, 7, ..., 43, then the partial block ends at 44
    ref = torch.cat([ref, all_states[:, -1:]], 1)
    _, _, blk = gated_delta_chunk(*xs, block_states=4, chunk_size=8)
    assert_close(blk, ref, tol=1e-10, what="block states fp64")
    up = torch.randn(blk.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g_ref = torch.autograd.grad((ref * up).sum(), xs[1:])  # q reads states, it does not write them
    g_blk = torch.autograd.grad((blk * up).sum(), xs[1:])
    for label, a, b in zip(("k", "v", "g", "beta", "initial_state"), g_blk, g_ref):
        assert_close(a, b, tol=1e-10, what=f"grad {label}")


def test_chunk_block_states_empty_and_bad():
    q, k, v, g, beta, s0 = chunk_inputs(0, True)
    o, final, blk = gated_delta_chunk(q, k, v, g, beta, s0, block_states=4)
    assert o.shape == (S, 0, 4, DV) and blk.shape == (S, 0, 4, DK, DV) and torch.equal(final, s0)
    xs = chunk_inputs(5, False)
    for bad in (0, -2, 2.5, True, "4"):
        with pytest.raises(ValueError, match="block_states"):
            gated_delta_chunk(*xs, block_states=bad)


# ------------------------------------------------------------------------------------------------------ bad inputs


def _bad_cases():
    xs = make_inputs(6, 2, GROUPED)

    def sub(i, x):
        ys = list(xs)
        ys[i] = x
        return ys

    q_c, k_c, v_c, g_c, beta_c, q_n, k_n, v_n, g_n, beta_n = xs
    return [
        ("q_c", sub(0, q_c[0])),
        ("k_c", sub(1, k_c[:, :5])),
        ("v_c", sub(2, v_c[:, :, :3])),  # 3 value heads cannot share 2 q/k heads
        ("g_c", sub(3, g_c[..., :2])),
        ("beta_c", sub(4, beta_c[:1])),
        ("q_n", sub(5, q_n[:, :, :5])),
        ("q_n", sub(5, q_n[:, :0])),  # no view at all
        ("q_n", sub(5, q_n[..., :4])),
        ("k_n", sub(6, k_n[:, :1])),
        ("k_n", sub(6, k_n[0])),
        ("v_n", sub(7, v_n[..., :8])),
        ("v_n", sub(7, v_n[:, :, :, :2])),
        ("g_n", sub(8, g_n[:, :, :5])),
        ("beta_n", sub(9, beta_n[..., None])),
    ]


@pytest.mark.parametrize("fn", FNS.values(), ids=FNS.keys())
def test_bad_inputs_raise(fn):
    for name, args in _bad_cases():
        with pytest.raises(ValueError, match=rf"^{name} "):
            fn(*args, 4)
    xs = make_inputs(6, 2, GROUPED)
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="^block_size"):
            fn(*xs, bad)
    for bad in ("tokens", "Block", None):
        with pytest.raises(ValueError, match="^clean_readout"):
            fn(*xs, 4, clean_readout=bad)
