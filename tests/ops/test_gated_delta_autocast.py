"""The gated delta cores run in fp32 inside bf16 autocast (flare.ops.precision.no_autocast).

Training runs under ``torch.autocast(dtype=bfloat16)``; without the guard every matmul of the recurrence would be
recast to bf16 (~0.5% relative error at T = 256). Each core entry point, fed as the layer feeds it (q/k
L2-normalised in fp32, v straight from an autocast linear in bf16, g/beta fp32) or with fp32 tensors throughout,
must give under autocast what it gives without it, to 1e-5 relative (gradients too for chunk and two_stream).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flare.model.gated_deltanet as gdn_module
from flare.config import LINEAR_ATTENTION, ModelConfig
from flare.model.context import ForwardContext, TwoStream
from flare.model.gated_deltanet import GatedDeltaNet
from flare.ops.gated_delta import (
    gated_delta,
    gated_delta_chunk,
    gated_delta_naive,
    gated_delta_rows,
    gated_delta_step,
    gated_delta_two_stream,
    gated_delta_two_stream_reference,
    read_state,
)

B, HK, H, DK, DV, E = 2, 2, 4, 16, 16, 32
TS = [256, 200]  # a multiple of the chunk sizes, and not
BLOCK = 3  # two-stream block size: 200 and 256 both end in a partial block
TOL = 1e-5


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def layer_like(lead: tuple[int, ...], T: int, seed: int, bf16_v: bool) -> list[torch.Tensor]:
    """q, k, v, g, beta as GatedDeltaNet builds them from one projection: with ``bf16_v`` the projection runs under
    autocast (v comes out bf16; q/k are normalised and g/beta computed in fp32, as the layer does), else in fp32."""
    gen = torch.Generator().manual_seed(seed)
    proj = nn.Linear(E, 2 * HK * DK + H * DV + 2 * H, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * E**-0.5)
    x = torch.randn(*lead, T, E, generator=gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_v):
        y = proj(x)
    qk, v, b, a = y.split([2 * HK * DK, H * DV, H, H], dim=-1)
    q, k = F.normalize(qk.float().reshape(*lead, T, 2 * HK, DK), dim=-1).chunk(2, dim=-2)
    v = v.reshape(*lead, T, H, DV)
    assert v.dtype == (torch.bfloat16 if bf16_v else torch.float32)
    return [q.contiguous(), k.contiguous(), v, -F.softplus(a.float() - 1.0), torch.sigmoid(b.float())]


def state(seed: int) -> torch.Tensor:
    return torch.randn(B, H, DK, DV, generator=torch.Generator().manual_seed(seed)) * 0.3


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    err = (actual.double() - expected.double()).abs().max().item()
    ref = expected.double().abs().max().item()
    assert err <= tol * ref, f"{what}: max abs diff {err:.3e} vs max abs {ref:.3e} (relative {err / ref:.2e})"


def both(fn, *args, **kwargs):
    """fn's outputs without and with bf16 autocast (a tuple either way)."""
    ref = fn(*args, **kwargs)
    with autocast():
        got = fn(*args, **kwargs)
    as_tuple = lambda r: tuple(r) if isinstance(r, tuple) else (r,)  # noqa: E731
    return as_tuple(ref), as_tuple(got)


def check_all(ref, got, what):
    for i, (r, a) in enumerate(zip(ref, got)):
        if isinstance(r, torch.Tensor):
            assert_rel(a, r, f"{what}[{i}]")


BF16_V = pytest.mark.parametrize("bf16_v", [True, False], ids=["bf16_v", "fp32"])


# ------------------------------------------------------------------------------------------------ entry points
@BF16_V
@pytest.mark.parametrize("T", TS)
def test_chunk_naive_and_dispatch_are_fp32_under_autocast(T, bf16_v):
    xs = layer_like((B,), T, seed=T, bf16_v=bf16_v)
    s0 = state(T)
    check_all(*both(gated_delta_chunk, *xs, s0), "chunk")
    check_all(*both(gated_delta_chunk, *xs, s0, block_states=BLOCK), "chunk block_states")
    check_all(*both(gated_delta_naive, *xs, s0), "naive")
    ref, got = both(gated_delta, *xs, s0)
    assert ref[2] == got[2] == "chunk"
    check_all(ref[:2], got[:2], "gated_delta")


@BF16_V
def test_step_and_read_state_are_fp32_under_autocast(bf16_v):
    q, k, v, g, beta = layer_like((B,), 1, seed=3, bf16_v=bf16_v)
    s0 = state(3)
    check_all(*both(gated_delta_step, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], s0, DK**-0.5), "step")
    check_all(*both(gated_delta, q, k, v, g, beta, s0), "gated_delta step")
    q = layer_like((B,), 17, seed=4, bf16_v=bf16_v)[0]
    check_all(*both(read_state, q, s0, DK**-0.5), "read_state")


@BF16_V
@pytest.mark.parametrize("T", TS)
def test_rows_are_fp32_under_autocast(T, bf16_v):
    xs = layer_like((B,), T, seed=T + 1, bf16_v=bf16_v)
    s0 = state(T + 1)
    check_all(*both(gated_delta_rows, *xs, s0, DK**-0.5), "rows")
    reads = torch.where(torch.arange(T) < T // 2, torch.arange(T), T - 1).expand(B, T)
    check_all(*both(gated_delta_rows, *xs, s0, DK**-0.5, reads=reads), "rows reads")
    scan = gated_delta_rows(*xs, s0, DK**-0.5)
    n = torch.tensor([T // 3, T])
    check_all(*both(scan.state_after, n), "state_after")  # the commit of a prefix


def two_stream_inputs(T: int, bf16_v: bool, V: int = 2) -> list[torch.Tensor]:
    clean = layer_like((B,), T, seed=T + 2, bf16_v=bf16_v)
    noisy = layer_like((B, V), T, seed=T + 3, bf16_v=bf16_v)
    return clean + noisy


@BF16_V
@pytest.mark.parametrize("readout", ["token", "block"])
@pytest.mark.parametrize("T", TS)
def test_two_stream_is_fp32_under_autocast(T, bf16_v, readout):
    xs = two_stream_inputs(T, bf16_v)
    check_all(*both(gated_delta_two_stream, *xs, BLOCK, clean_readout=readout), "two_stream")


@pytest.mark.parametrize("T", [200])
def test_two_stream_reference_is_fp32_under_autocast(T):
    xs = two_stream_inputs(T, bf16_v=True, V=1)
    check_all(*both(gated_delta_two_stream_reference, *xs, BLOCK), "two_stream_reference")


def grads(fn, xs, weights, use_autocast):
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
        outs = fn(*leaves)
        loss = sum((o.float() * w).sum() for o, w in zip(outs, weights))
    loss.backward()
    return [x.grad for x in leaves]


@BF16_V
@pytest.mark.parametrize("T", TS)
def test_chunk_gradients_are_fp32_under_autocast(T, bf16_v):
    xs = layer_like((B,), T, seed=T + 5, bf16_v=bf16_v) + [state(T + 5)]
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(B, T, H, DV, generator=gen), torch.randn(B, H, DK, DV, generator=gen)]
    ref = grads(gated_delta_chunk, xs, weights, False)
    got = grads(gated_delta_chunk, xs, weights, True)
    for name, r, a in zip(("q", "k", "v", "g", "beta", "s0"), ref, got):
        # bf16 v: its gradient is rounded to bf16 both ways; a last-place flip is the only difference allowed.
        assert_rel(a, r, f"d{name}", tol=TOL if a.dtype == torch.float32 else 2**-8)


@BF16_V
@pytest.mark.parametrize("T", TS)
def test_two_stream_gradients_are_fp32_under_autocast(T, bf16_v):
    xs = two_stream_inputs(T, bf16_v)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(B, T, H, DV, generator=gen), torch.randn(B, 2, T, H, DV, generator=gen)]
    fn = lambda *a: gated_delta_two_stream(*a, BLOCK)  # noqa: E731
    ref, got = grads(fn, xs, weights, False), grads(fn, xs, weights, True)
    for i, (r, a) in enumerate(zip(ref, got)):
        assert_rel(a, r, f"grad {i}", tol=TOL if a.dtype == torch.float32 else 2**-8)


# --------------------------------------------------------------------------------------------------- the layer
def tiny_layer() -> GatedDeltaNet:
    cfg = ModelConfig(family="qwen3_5", vocab_size=96, hidden_size=E, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, layer_types=[LINEAR_ATTENTION],
                      linear_key_head_dim=DK, linear_value_head_dim=DV, linear_num_key_heads=HK,
                      linear_num_value_heads=H)
    torch.manual_seed(0)
    layer = GatedDeltaNet(cfg, 0)
    with torch.no_grad():
        layer.A_log.uniform_(-1.0, 1.0)
        layer.dt_bias.uniform_(-1.0, 1.0)
    return layer


class Recorder:
    """Wraps a core op: keeps the tensors it was called with and what it returned."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


@pytest.mark.parametrize("T", TS)
def test_layer_causal_core_is_fp32_under_autocast(T, monkeypatch):
    layer = tiny_layer()
    rec = Recorder(gdn_module.gated_delta)
    monkeypatch.setattr(gdn_module, "gated_delta", rec)
    x = torch.randn(B, T, E)
    with torch.no_grad():
        with autocast():
            y_bf16 = layer(x, ForwardContext("causal", None, None))
        y_fp32 = layer(x, ForwardContext("causal", None, None))
    (args, kwargs, out), (args32, _, out32) = rec.calls
    assert args[2].dtype == torch.bfloat16 and args[0].dtype == torch.float32  # v from the autocast projections
    assert out[2] == "chunk" and out[0].dtype == torch.bfloat16
    with torch.no_grad():
        ref = gated_delta(*args, **kwargs)  # the same pre-core tensors, no autocast
    assert_rel(out[0], ref[0], "core o")
    assert_rel(out[1], ref[1], "core final state")
    # The core's inputs differ by the bf16 projections only; the layer's output stays close to the fp32 one.
    assert (y_bf16.float() - y_fp32).abs().max() <= 0.05 * y_fp32.abs().max()
    assert out32[0].dtype == torch.float32


@pytest.mark.parametrize("readout", ["token", "block"])
def test_layer_two_stream_core_is_fp32_under_autocast(readout, monkeypatch):
    layer = tiny_layer()
    rec = Recorder(gdn_module.gated_delta_two_stream)
    monkeypatch.setattr(gdn_module, "gated_delta_two_stream", rec)
    L, V = 200, 2  # documents of 99 and 101 tokens (starts block-aligned); the second ends in a partial block
    doc_ids = torch.cat([torch.zeros(99), torch.ones(101)]).long()[None].expand(B, L)
    ids = torch.zeros(B, (1 + V) * L, dtype=torch.long)
    ctx = ForwardContext.build(ids, rotary_dim=16, head_dim=16, rope_theta=1e4, dtype=torch.float32,
                               layout=TwoStream(doc_ids, BLOCK, V, readout))
    x = torch.randn(B, (1 + V) * L, E)
    with torch.no_grad(), autocast():
        layer(x, ctx)
    ((args, kwargs, out),) = rec.calls
    assert args[2].dtype == torch.bfloat16
    with torch.no_grad():
        ref = gated_delta_two_stream(*args, **kwargs)
    assert_rel(out[0], ref[0], "clean o")
    assert_rel(out[1], ref[1], "noisy o")
