"""The optional fused backend (flare.ops.gated_delta.fla): parity with the torch chunk form on CUDA, and the
selection logic everywhere.

The parity tests run only on a CUDA device with flash-linear-attention installed and skip with their reason
elsewhere; nothing here imports ``fla`` at module import (on a CPU machine it must not even be installed:
transformers would route its oracle to Triton kernels). benchmarks/gpu_check.sh runs the ``cuda`` tests of this
file with ``-rs``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from flare.ops.gated_delta import fla, gated_delta, gated_delta_chunk

_MISSING = ("needs a CUDA device" if not torch.cuda.is_available() else
            "needs flash-linear-attention (the gpu extra; GPU machines only)" if importlib.util.find_spec("fla") is None
            else "")
CUDA_FLA = pytest.mark.skipif(bool(_MISSING), reason=_MISSING or "runs")

B, DK, DV = 2, 64, 64
# Relative RMS error (||a - b|| / ||b||) against the fp32 torch path: the kernel multiplies 16-bit operands, so
# ~0.5% is its usual level; a layout or convention error gives ~100%.
TOL_FWD, TOL_GRAD, TOL_GATES = 2e-2, 3e-2, 5e-2


@pytest.fixture(autouse=True)
def _fresh_lookup():
    """``fla.installed`` and ``fla.backward_works`` cache their answers: start and end every test without one."""
    fla.installed.cache_clear()
    fla.backward_works.cache_clear()
    yield
    fla.installed.cache_clear()
    fla.backward_works.cache_clear()


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp(min=1e-30)).item()


def inputs(T: int, Hk: int, H: int, dtype: torch.dtype, device, seed: int = 0, with_state: bool = True):
    """As the layer feeds the op: q/k L2-normalised fp32, v in ``dtype``, g (log decay) and beta fp32."""
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=gen)

    q = F.normalize(rn(B, T, Hk, DK), dim=-1)
    k = F.normalize(rn(B, T, Hk, DK), dim=-1)
    v = rn(B, T, H, DV).to(dtype)
    g = F.logsigmoid(rn(B, T, H) + 2.0)  # per-step log decay, mostly mild, a few strong
    beta = torch.sigmoid(rn(B, T, H))
    s0 = rn(B, H, DK, DV) * 0.1 if with_state else None
    return [x if x is None else x.to(device) for x in (q, k, v, g, beta, s0)]


# ------------------------------------------------------------------------------------------ selection (any CPU)
def test_available_is_false_on_the_cpu():
    assert fla.available("cpu") is False
    assert fla.available(torch.device("cpu")) is False


def test_selection_falls_back_to_torch_on_the_cpu_even_with_fla_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **kw: SimpleNamespace(name="fla") if name == "fla" else real(name, *a, **kw))
    assert fla.installed()  # pretends fla is there
    assert fla.available("cuda") and not fla.available("cpu")
    q, k, v, g, beta, s0 = inputs(40, 2, 4, torch.bfloat16, "cpu")
    assert not fla.selected(q, v)
    o, state, name = gated_delta(q, k, v, g, beta, s0)
    assert name == "chunk"  # and fla was never imported (it is not installed: importing it would have raised)
    o_ref, s_ref = gated_delta_chunk(q, k, v, g, beta, s0)
    assert torch.equal(o, o_ref) and torch.equal(state, s_ref)


def test_selection_rules(monkeypatch):
    """With a device that counts as available: 16-bit values only, head dims the kernel takes, and never when
    FLARE_GDN_BACKEND=torch."""
    monkeypatch.setattr(fla, "available", lambda device: True)
    monkeypatch.delenv(fla.ENV, raising=False)
    q, _, v, *_ = inputs(20, 2, 4, torch.bfloat16, "cpu", with_state=False)
    assert fla.selected(q, v)
    assert fla.selected(q, v.half())
    assert not fla.selected(q, v.float())  # a fp32 model keeps the fp32 torch path
    wide = torch.zeros(1, 20, 2, fla.MAX_HEAD_DIM + 1)
    assert not fla.selected(wide, v)
    monkeypatch.setenv(fla.ENV, "torch")
    assert not fla.selected(q, v)
    monkeypatch.setenv(fla.ENV, "auto")
    assert fla.selected(q, v)
    monkeypatch.setenv(fla.ENV, "triton")
    with pytest.raises(ValueError, match=fla.ENV):
        fla.selected(q, v)
    monkeypatch.setattr(fla, "available", lambda device: False)
    monkeypatch.setenv(fla.ENV, "auto")
    assert not fla.selected(q, v)


def fake_kernel(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                **extra):
    """A stand-in for fla's ``chunk_gated_delta_rule`` that asserts what every fla release accepts and computes
    with the torch chunk form: checks the wrapper's side of the mapping on any machine."""
    assert not extra and output_final_state and isinstance(scale, float)
    assert q.dtype == k.dtype == v.dtype == beta.dtype and q.dtype in (torch.bfloat16, torch.float16)
    assert g.dtype == torch.float32 and q.shape == k.shape and q.shape[:3] == v.shape[:3]  # heads repeated
    bounds = [0, q.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    assert cu_seqlens is None or (q.shape[0] == 1 and cu_seqlens.dtype == torch.long)
    n = q.shape[0] if cu_seqlens is None else len(bounds) - 1
    assert initial_state is None or (initial_state.dtype == torch.float32 and initial_state.shape[0] == n)
    outs, states = [], []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        s0 = None
        if initial_state is not None:
            s0 = initial_state if cu_seqlens is None else initial_state[i : i + 1]
        o, st = gated_delta_chunk(*(x[:, lo:hi].float() for x in (q, k, v, g, beta)), s0, scale)
        outs.append(o)
        states.append(st)
    return torch.cat(outs, 1).to(q.dtype), torch.cat(states, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_wrapper_maps_our_contract_to_the_kernels(dtype, monkeypatch):
    monkeypatch.setattr(fla, "_kernel", lambda: (fake_kernel, {}))
    xs = inputs(37, 2, 4, dtype, "cpu", seed=3)
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    o, state = fla.gated_delta_fla(*leaves)
    assert o.dtype == dtype and state.dtype == torch.float32 and o.shape == (B, 37, 4, DV)
    o_ref, s_ref = gated_delta_chunk(*xs)
    assert rel_rms(o, o_ref) <= TOL_FWD and rel_rms(state, s_ref) <= TOL_FWD
    (o.float().sum() + state.sum()).backward()
    assert all(x.grad is not None and x.grad.dtype == x.dtype and x.grad.abs().sum() > 0 for x in leaves)
    # Packed documents: one row, one initial and final state per document.
    q, k, v, g, beta = (x[:1] for x in xs[:5])
    cu = torch.tensor([0, 5, 6, 37])
    s0 = torch.randn(3, 4, DK, DV) * 0.1
    o, states = fla.gated_delta_fla(q, k, v, g, beta, s0, cu_seqlens=cu)
    assert states.shape == (3, 4, DK, DV)
    for n, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_ref, s_ref = gated_delta_chunk(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi], beta[:, lo:hi],
                                         s0[n : n + 1])
        assert rel_rms(o[:, lo:hi], o_ref) <= TOL_FWD and rel_rms(states[n : n + 1], s_ref) <= TOL_FWD
    with pytest.raises(ValueError, match="batch must be 1"):
        fla.gated_delta_fla(*xs[:5], cu_seqlens=cu)
    with pytest.raises(ValueError, match="initial_state"):
        fla.gated_delta_fla(q, k, v, g, beta, s0[:2], cu_seqlens=cu)
    # And the dispatcher, on a device that counts as available (here the CPU, with the stand-in kernel).
    monkeypatch.setattr(fla, "available", lambda device: True)
    monkeypatch.delenv(fla.ENV, raising=False)
    assert gated_delta(*xs)[2] == ("fla" if dtype == torch.bfloat16 else "chunk")


class _NoBackward(torch.autograd.Function):
    """The identity whose backward raises, as fla 0.6.0's does under Triton 3.6 on Hopper."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results")


def kernel_without_backward(q, k, v, g, beta, **kw):
    o, state = fake_kernel(q, k, v, g, beta, **kw)
    return _NoBackward.apply(o), state


def test_a_kernel_without_backward_serves_inference_only(monkeypatch):
    """Where fla's backward raises, the probe says so once (one warning), differentiable inputs take the torch
    chunk form and inference keeps fla; where it runs, both take fla."""
    monkeypatch.setattr(fla, "available", lambda device: True)
    monkeypatch.delenv(fla.ENV, raising=False)
    xs = inputs(40, 2, 4, torch.bfloat16, "cpu", seed=2)
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]

    monkeypatch.setattr(fla, "_kernel", lambda: (kernel_without_backward, {}))
    with pytest.warns(RuntimeWarning, match="backward failed on cpu"):
        assert fla.backward_works("cpu") is False
    assert fla.selected(xs[0], xs[2]) and not fla.selected(xs[0], xs[2], needs_grad=True)
    assert gated_delta(*xs)[2] == "fla"
    o, state, name = gated_delta(*leaves)
    assert name == "chunk"
    (o.float().sum() + state.sum()).backward()  # the torch form's backward: no error
    with torch.no_grad():
        assert gated_delta(*leaves)[2] == "fla"  # no backward will follow

    fla.backward_works.cache_clear()
    monkeypatch.setattr(fla, "_kernel", lambda: (fake_kernel, {}))
    assert fla.backward_works("cpu") is True
    assert gated_delta(*leaves)[2] == "fla"


def test_importing_the_model_never_imports_fla():
    code = ("import sys, flare.ops.gated_delta, flare.model.gated_deltanet; "
            "assert 'fla' not in sys.modules, 'fla imported at import time'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# --------------------------------------------------------------------------------------- parity (CUDA with fla)
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no_state"])
@pytest.mark.parametrize("Hk, H", [(2, 4), (4, 4)], ids=["gqa", "equal"])
@pytest.mark.parametrize("T", [257, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@CUDA_FLA
def test_fla_matches_torch_chunk_cuda(dtype, T, Hk, H, with_state):
    xs = inputs(T, Hk, H, dtype, "cuda", seed=T + H, with_state=with_state)
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in xs]
    ref_leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in xs]

    o, state = fla.gated_delta_fla(*leaves)
    # The reference runs on the same values in fp32 (v included, so that its gradient is the fp32 one).
    ref_in = [x if x is None else x.float() for x in ref_leaves]
    o_ref, s_ref = gated_delta_chunk(*ref_in)
    assert o.dtype == dtype and o.shape == o_ref.shape
    assert state.dtype == torch.float32 and state.shape == s_ref.shape
    assert rel_rms(o, o_ref) <= TOL_FWD, rel_rms(o, o_ref)
    assert rel_rms(state, s_ref) <= TOL_FWD, rel_rms(state, s_ref)

    if not fla.backward_works("cuda"):  # (it warned why): training takes the torch form there
        assert gated_delta(*leaves)[2] == "chunk"
        pytest.skip("forward checked; fla's backward does not run on this GPU with this Triton (see the warning)")
    gen = torch.Generator(device="cuda").manual_seed(1)
    w_o = torch.randn(o_ref.shape, generator=gen, device="cuda")
    w_s = torch.randn(s_ref.shape, generator=gen, device="cuda")
    ((o.float() * w_o).sum() + (state * w_s).sum()).backward()
    ((o_ref * w_o).sum() + (s_ref * w_s).sum()).backward()
    names = ("q", "k", "v", "g", "beta", "s0")
    for name, a, r in zip(names, leaves, ref_leaves):
        if a is None:
            continue
        tol = TOL_GATES if name in ("g", "beta") else TOL_GRAD
        err = rel_rms(a.grad, r.grad)
        assert err <= tol, f"d{name}: relative RMS error {err:.3e}"


@CUDA_FLA
def test_fla_packed_documents_cuda():
    lengths = [70, 1, 129, 57]
    T = sum(lengths)
    q, k, v, g, beta, _ = inputs(T, 2, 4, torch.bfloat16, "cuda", seed=5, with_state=False)
    q, k, v, g, beta = (x[:1] for x in (q, k, v, g, beta))
    s0 = torch.randn(len(lengths), 4, DK, DV, device="cuda") * 0.1
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    o, states = fla.gated_delta_fla(q, k, v, g, beta, s0, cu_seqlens=cu)
    for n, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        doc = [x[:, lo:hi] for x in (q, k, v, g, beta)]
        o_ref, s_ref = gated_delta_chunk(*doc[:2], doc[2].float(), *doc[3:], s0[n : n + 1])
        assert rel_rms(o[:, lo:hi], o_ref) <= TOL_FWD, (n, rel_rms(o[:, lo:hi], o_ref))
        assert rel_rms(states[n : n + 1], s_ref) <= TOL_FWD, (n, rel_rms(states[n : n + 1], s_ref))


@CUDA_FLA
def test_dispatch_picks_fla_on_cuda(monkeypatch):
    monkeypatch.delenv(fla.ENV, raising=False)
    q, k, v, g, beta, s0 = inputs(100, 2, 4, torch.bfloat16, "cuda")
    assert gated_delta(q, k, v, g, beta, s0)[2] == "fla"
    assert gated_delta(q, k, v, g, beta, s0, prefer="chunk")[2] == "chunk"  # an explicit form stays torch
    assert gated_delta(q, k, v.float(), g, beta, s0)[2] == "chunk"  # fp32 values: the fp32 torch path
    assert gated_delta(*(x[:, :10] for x in (q, k, v, g, beta)), s0)[2] == "naive"
    monkeypatch.setenv(fla.ENV, "torch")
    assert gated_delta(q, k, v, g, beta, s0)[2] == "chunk"
    monkeypatch.delenv(fla.ENV)
    # Under bf16 autocast the kernel sees the same operands: the same result.
    o, s, _ = gated_delta(q, k, v, g, beta, s0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        o_ac, s_ac, name = gated_delta(q, k, v, g, beta, s0)
    assert name == "fla" and rel_rms(o_ac, o) <= 1e-6 and rel_rms(s_ac, s) <= 1e-6
