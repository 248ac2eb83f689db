"""The short conv over a tree of rows: each row's window follows its own path, equal to the chain conv there."""

from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from flare.ops.conv import LOOP_MIN_CHANNELS, causal_conv1d, tree_conv1d


def _data(B, T, C, K, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, C, generator=g, dtype=torch.float64), torch.randn(C, K, generator=g, dtype=torch.float64),
            torch.randn(B, K - 1, C, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("C", [6, LOOP_MIN_CHANNELS])  # both ways of summing the taps
@pytest.mark.parametrize("T, K", [(1, 4), (5, 4), (9, 2), (3, 5)])
def test_a_chain_is_the_causal_conv(T, K, C):
    x, w, state = _data(2, T, C, K, T)
    parent = torch.arange(T).expand(2, T) - 1
    y, _ = causal_conv1d(x, w, state)
    torch.testing.assert_close(tree_conv1d(x, w, state, parent), y, rtol=1e-12, atol=1e-12)
    # In bf16 (summed in fp32) the two take the same steps: the same values.
    x, w, state = (t.to(torch.bfloat16) for t in (x, w, state))
    assert torch.equal(tree_conv1d(x, w, state, parent), causal_conv1d(x, w, state)[0])


def test_each_group_convolves_its_own_path():
    # Clean chain 0..3, then a group of 2 after each prefix 1, 3 and 0.
    parent = [-1, 0, 1, 2, 0, 4, 2, 6, -1, 8]
    x, w, state = _data(1, len(parent), 3, 4, 0)
    y = tree_conv1d(x, w, state, torch.tensor([parent]))
    for r in range(len(parent)):
        path, a = [], r
        while a >= 0:
            path.append(a)
            a = parent[a]
        ref, _ = causal_conv1d(x[:, path[::-1]], w, state)
        torch.testing.assert_close(y[0, r], ref[0, -1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("C", [6, LOOP_MIN_CHANNELS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_rows_match_a_depthwise_conv(C, dtype):
    """The window sums of short runs (decode steps, verify rows) == torch's depthwise conv1d over the carried
    inputs and the new ones, within the dtype's rounding of the output."""
    x, w, state = (t.to(dtype) for t in _data(3, 7, C, 4, 1))
    y, new_state = causal_conv1d(x, w, state)
    full = torch.cat([state, x], dim=1).double()
    ref = F.conv1d(full.transpose(1, 2), w.double()[:, None, :], groups=C).transpose(1, 2)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    assert torch.equal(new_state, torch.cat([state, x], dim=1)[:, -3:])


def test_the_inputs_a_caller_already_has_give_the_same_conv():
    """``full=conv_inputs(x, state)`` (what a rows forward keeps for its commit) changes nothing."""
    from flare.ops.conv import conv_inputs

    g = torch.Generator().manual_seed(7)
    x, w, state = torch.randn(2, 5, 6, generator=g), torch.randn(6, 4, generator=g), torch.randn(2, 3, 6, generator=g)
    full = conv_inputs(x, state, 4)
    assert full.shape == (2, 8, 6) and torch.equal(full[:, :3], state) and torch.equal(full[:, 3:], x)
    y, s = causal_conv1d(x, w, state)
    y2, s2 = causal_conv1d(x, w, state, full=full)
    assert torch.equal(y, y2) and torch.equal(s, s2)
    parent = torch.tensor([[-1, 0, 1, 1, 3]] * 2)
    assert torch.equal(tree_conv1d(x, w, state, parent), tree_conv1d(x, w, state, parent, full=full))
    assert torch.equal(conv_inputs(x, None, 4)[:, :3], torch.zeros(2, 3, 6))


@pytest.mark.parametrize("C", [6, LOOP_MIN_CHANNELS])
@pytest.mark.parametrize("T", [17, 40])
def test_long_rows_without_gradients_take_the_window_sum_and_equal_the_conv(T, C, monkeypatch):
    """Past WINDOW_MAX_T rows a forward that needs no gradient sums the K-window (no conv call) and equals
    F.conv1d's causal conv, which training's rows still take (with gradients that match)."""
    import flare.ops.conv as conv

    x, w, state = _data(2, T, C, 4, T)
    with torch.no_grad():
        want = F.conv1d(torch.cat([state, x], 1).transpose(1, 2), w[:, None, :], groups=C).transpose(1, 2)
        calls, real = [], F.conv1d
        monkeypatch.setattr(conv.F, "conv1d", lambda *a, **k: calls.append(1) or real(*a, **k))
        y, new_state = causal_conv1d(x, w, state)
    assert calls == [] and y.is_contiguous()
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(new_state, x[:, -3:])
    xg = x.clone().requires_grad_()
    yg, _ = causal_conv1d(xg, w, state)
    assert calls == [1]
    torch.testing.assert_close(yg, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B, T", [(1, 1), (1, 5), (3, 1), (2, 40)])
def test_the_new_state_has_its_own_standard_strides(B, T):
    """The carried state is never a view of the inputs: its strides are the same whatever T (a compiled decode
    step guards on them), at one sequence too."""
    x, w, state = _data(B, T, 8, 4, 0)
    _, new_state = causal_conv1d(x, w, state)
    assert new_state.stride() == (3 * 8, 8, 1)
