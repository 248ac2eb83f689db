"""oneDNN-packed linears (``flare.model.packed_linear``): in bf16 the same outputs as ``F.linear`` bit for bit
over awkward shapes, in fp32 the same to fp32 rounding; ``F.linear`` wherever the packed copy does not apply
(gradients, other dtypes, fp32 weights under the size threshold), a repack when the weight changes, decoding
tokens unchanged by packing (bf16) and AR-Trust on packed fp32 linears still exact. The packed copy is kept only
inside ``frozen_weights()``, as decoding runs: every test here runs inside one. Small test shapes are packed in
fp32 too (the size threshold is set to 0 here, except where it is tested)."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flare
from flare.decoding import ArTrustOptions, SamplingParams
from flare.engine import decode
import flare.device as device_module
from flare.device import FP32_MIN_NUMEL, pack_linears
from flare.model import frozen_weights
import flare.model.packed_linear as packed_linear_module
from flare.model.packed_linear import COLUMN_MAJOR, PLAIN, PackedLinear, linear_path, packed_path, prepack
from flare.testing.checkpoints import save_tiny_checkpoint

CPU = torch.device("cpu")
needs_packing = pytest.mark.skipif(not pack_linears(CPU, torch.bfloat16),
                                   reason="no native bf16 with oneDNN on this CPU: bf16 linears are never packed here")
needs_onednn = pytest.mark.skipif(not pack_linears(CPU, torch.float32),
                                  reason="no oneDNN in this torch build: linears are never packed here")
DTYPES = [pytest.param(torch.bfloat16, marks=needs_packing, id="bf16"),
          pytest.param(torch.float32, marks=needs_onednn, id="fp32")]


@pytest.fixture(autouse=True)
def decoding(monkeypatch):
    monkeypatch.setattr(device_module, "FP32_MIN_NUMEL", 0)
    with frozen_weights():
        yield


def packed_linear(n_in: int, n_out: int, bias: bool, seed: int = 0,
                  dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Linear, PackedLinear]:
    torch.manual_seed(seed)
    plain = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    packed = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    packed.load_state_dict(plain.state_dict())
    prepack(packed)
    assert isinstance(packed, PackedLinear)
    return plain, packed


def same(dtype: torch.dtype, a: torch.Tensor, b: torch.Tensor) -> None:
    """bf16: the same oneDNN kernel, bit for bit; fp32: oneDNN against MKL, equal to fp32 rounding."""
    if dtype == torch.bfloat16:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (5,), (3, 7), (2, 1, 9)])
@pytest.mark.parametrize("n_in,n_out,bias", [(13, 7, True), (64, 96, False), (576, 1536, False), (1, 3, True)])
def test_packed_equals_f_linear(shape, n_in, n_out, bias, dtype):
    plain, packed = packed_linear(n_in, n_out, bias, dtype=dtype)
    x = torch.randn(*shape, n_in).to(dtype)
    with torch.no_grad():
        same(dtype, packed(x), plain(x))
        wide = torch.randn(*shape, 2 * n_in).to(dtype)[..., ::2]  # a strided input
        same(dtype, packed(wide), plain(wide.contiguous()))
    with torch.inference_mode():
        same(dtype, packed(x), plain(x))


@needs_onednn
def test_fp32_weights_below_the_threshold_take_f_linear_on_a_column_major_copy(monkeypatch):
    monkeypatch.undo()  # the real threshold
    assert device_module.FP32_MIN_NUMEL == FP32_MIN_NUMEL > 0
    calls, weights = [], []
    pointwise, linear = torch.ops.mkldnn._linear_pointwise, F.linear
    monkeypatch.setattr(packed_linear_module.torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a: calls.append(1) or pointwise(*a))
    monkeypatch.setattr(packed_linear_module.F, "linear", lambda x, w, b=None: weights.append(w) or linear(x, w, b))
    small = packed_linear(FP32_MIN_NUMEL // 256 - 1, 256, False, dtype=torch.float32)
    large = packed_linear(FP32_MIN_NUMEL // 256, 256, False, dtype=torch.float32)
    with frozen_weights(), torch.no_grad():
        x = torch.randn(3, small[0].in_features)
        same(torch.float32, small[1](x), linear(x, small[0].weight))
        assert not calls and weights[-1].stride() == (1, 256) and torch.equal(weights[-1], small[1].weight)
        assert linear_path(small[1]) == COLUMN_MAJOR
        x = torch.randn(3, large[0].in_features)
        same(torch.float32, large[1](x), linear(x, large[0].weight))
        assert len(calls) == 1 and linear_path(large[1]) == packed_path(torch.float32)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 7), (2, 1, 9), (8, 7, 1)])
@pytest.mark.parametrize("n_in,n_out,bias", [(13, 7, True), (128, 512, False), (1, 3, True), (256, 128, True)])
def test_column_major_copies_equal_f_linear(monkeypatch, shape, n_in, n_out, bias):
    monkeypatch.undo()  # the real threshold: these fp32 weights are all below it
    plain, linear = packed_linear(n_in, n_out, bias, dtype=torch.float32)
    x = torch.randn(*shape, n_in)
    with frozen_weights(), torch.inference_mode():
        torch.testing.assert_close(linear(x), plain(x), rtol=1e-5, atol=1e-5)
        wide = torch.randn(*shape, 2 * n_in)[..., ::2]  # a strided input
        torch.testing.assert_close(linear(wide), plain(wide.contiguous()), rtol=1e-5, atol=1e-5)
        assert linear._derived["packed"][1].t().is_contiguous()
        linear.weight.mul_(-0.5)  # in place: the copy is made again
        torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_and_other_dtypes_take_f_linear(dtype):
    plain, packed = packed_linear(24, 40, True, dtype=dtype)
    x = torch.randn(3, 24).to(dtype).requires_grad_()
    packed(x).float().square().sum().backward()
    assert packed.weight.grad is not None and x.grad is not None
    grad_w, grad_x = packed.weight.grad.clone(), x.grad.clone()
    x.grad = None
    plain(x).float().square().sum().backward()
    assert torch.equal(grad_w, plain.weight.grad) and torch.equal(grad_x, x.grad)
    packed.double()
    with torch.no_grad():
        x64 = torch.randn(2, 24, dtype=torch.float64)
        assert torch.equal(packed(x64), F.linear(x64, packed.weight, packed.bias))


@needs_packing
def test_a_changed_weight_is_repacked():
    plain, packed = packed_linear(32, 16, False)
    x = torch.randn(4, 32).to(torch.bfloat16)
    with torch.no_grad():
        packed(x)
        for change in (lambda m: m.weight.mul_(-0.5),  # in place: an optimizer step
                       lambda m: m.load_state_dict({"weight": torch.randn(16, 32).to(torch.bfloat16)}),
                       lambda m: setattr(m, "weight", nn.Parameter(torch.randn(16, 32).to(torch.bfloat16)))):
            change(packed)
            assert torch.equal(packed(x), F.linear(x, packed.weight))


def test_prepack_keeps_parameters_and_state_dict(monkeypatch):
    monkeypatch.undo()  # the real fp32 threshold
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4, bias=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert prepack(model) == 2 and prepack(model) == 2
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # fp32 weights under the size threshold: no packed copy, a column-major one
    assert linear_path(model) == (COLUMN_MAJOR if pack_linears(CPU, torch.float32) else PLAIN)


def tiny_model(dtype: torch.dtype) -> nn.Module:
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_checkpoint(tmp, "qwen3_5", seed=3, tokenizer=False, hidden_size=96, intermediate_size=160,
                                    num_hidden_layers=4, vocab_size=300, head_dim=24, linear_key_head_dim=24,
                                    linear_value_head_dim=24)
        model = flare.load_model(path, dtype=dtype)
    model.config.mask_token_id = 299
    return model.eval()


@pytest.fixture(scope="module")
def bf16_model():
    return tiny_model(torch.bfloat16)


def random_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 299, (n,), generator=g).tolist() for n in (4, 17, 9)]


@needs_packing
# AR-Trust always drafting: with pauses, a greedy batch's rounds follow the wall clock (flare.decoding.pacer).
@pytest.mark.parametrize("mode", ["causal", ArTrustOptions(redraft="every", pause=0), "diffusion_trust"])
def test_decoding_tokens_do_not_change_with_packing(bf16_model, mode, monkeypatch):
    import copy

    import flare.engine.stepper as stepper

    prompts = random_prompts()
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    plain_model = copy.deepcopy(bf16_model)
    for module in plain_model.modules():  # packed by an earlier case
        if isinstance(module, PackedLinear):
            module.__class__ = nn.Linear
    monkeypatch.setattr(stepper, "pack_linears", lambda device, dtype: False)
    plain = decode(plain_model, prompts, params, mode)
    monkeypatch.undo()
    packed = decode(bf16_model, prompts, params, mode)
    assert plain.kernel_paths["linear"] == PLAIN and packed.kernel_paths["linear"] == packed_path(torch.bfloat16)
    assert packed.token_ids == plain.token_ids and packed.forwards == plain.forwards


@needs_onednn
@pytest.mark.parametrize("redraft", ["every", "last"])
def test_ar_trust_on_packed_fp32_linears_is_greedy_causal(redraft):
    # fp32 packed linears are another kernel than F.linear's: the exactness of AR-Trust holds on them too.
    model = tiny_model(torch.float32)
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    causal = decode(model, random_prompts(), params, "causal")
    trust = decode(model, random_prompts(), params, ArTrustOptions(redraft=redraft, pause=0))
    assert causal.kernel_paths["linear"] == trust.kernel_paths["linear"] == packed_path(torch.float32)
    assert trust.token_ids == causal.token_ids


@needs_packing
def test_a_packed_model_copies_and_pickles():
    import copy
    import io

    plain, packed = packed_linear(16, 8, True)
    x = torch.randn(2, 16).to(torch.bfloat16)
    with torch.no_grad():
        packed(x)
        buffer = io.BytesIO()
        torch.save(packed, buffer)
        buffer.seek(0)
        for twin in (copy.deepcopy(packed), torch.load(buffer, weights_only=False)):
            assert isinstance(twin, PackedLinear) and torch.equal(twin(x), plain(x))


@needs_packing
def test_packing_happens_once_with_or_without_grad_mode(monkeypatch):
    import flare.model.packed_linear as module

    plain, packed = packed_linear(16, 8, False)
    packed.requires_grad_(False)
    calls = []
    reorder = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(module.torch.ops.mkldnn, "_reorder_linear_weight", lambda *a: calls.append(1) or reorder(*a))
    x = torch.randn(3, 16).to(torch.bfloat16)
    for _ in range(3):
        assert torch.equal(packed(x), plain(x).detach())  # grad mode on, nothing requires a gradient
        with torch.no_grad():
            assert torch.equal(packed(x), plain(x))
    assert len(calls) == 1
    monkeypatch.setattr(module, "weights_frozen", lambda: False)  # outside decoding: plain F.linear, no packing
    fresh = packed_linear(16, 8, False)[1]
    with torch.no_grad():
        assert torch.equal(fresh(x), plain(x))
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_traced_packed_linear_is_f_linear_in_one_graph(dtype):
    """Under torch.compile a packed linear is plain F.linear (inductor packs frozen weights itself): one graph, no
    break at the packed copy's data-pointer memo or the CPU probe, and the packed copy is neither made nor kept."""
    plain, packed = packed_linear(24, 40, True, dtype=dtype)
    x = torch.randn(3, 24).to(dtype)
    graph = torch.compile(packed, backend="eager", fullgraph=True)
    with torch.no_grad():
        traced = graph(x)
        assert "_derived" not in packed.__dict__
        torch.testing.assert_close(traced, plain(x), rtol=0, atol=0)
        same(dtype, packed(x), plain(x))  # eager still runs packed, as before
    assert "packed" in packed.__dict__["_derived"]
