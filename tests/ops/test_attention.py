"""Masked grouped-query attention: expanding the key/value heads (what CUDA runs, so that a fused kernel takes
the mask) and folding query heads into rows (what the CPU runs for decoding's few rows) equal the grouped path,
and on CUDA no masked call falls back to SDPA's math kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flare.masks import ALL_VISIBLE
from flare.ops.attention import (FOLD_MAX_ROWS, FP32_FOLD_MIN_KEYS_DIMS, attention, attention_path, fold_groups,
                                 fold_mask, folded_sdpa, masked_sdpa)


@pytest.mark.parametrize("heads, groups", [(4, 1), (4, 2), (6, 3), (2, 2)])
def test_expanded_kv_heads_equal_grouped_attention(heads, groups):
    g = torch.Generator().manual_seed(0)
    B, T, S, D = 2, 5, 9, 8
    q = torch.randn(B, heads, T, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, groups, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(B, 1, T, S, generator=g) < 0.7
    mask[..., 0] = True  # every row sees something
    grouped = masked_sdpa(q, k, v, mask, D**-0.5, expand_kv=False)
    expanded = masked_sdpa(q, k, v, mask, D**-0.5, expand_kv=True)
    torch.testing.assert_close(expanded, grouped, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused SDPA kernels need a CUDA device")
def test_masked_gqa_attention_runs_without_the_math_kernel_on_cuda():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, S, H, G, D = 2, 7, 40, 8, 2, 64
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, S, G, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    mask = torch.ones(B, 1, T, S, dtype=torch.bool, device="cuda").tril(S - T)
    ref = attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), mask.cpu(), D**-0.5)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = attention(q, k, v, mask, D**-0.5)  # raises if only the math kernel could run it
    torch.testing.assert_close(out.float().cpu(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, groups, T", [(4, 2, 1), (6, 3, 1), (4, 1, 7), (8, 2, 16), (6, 2, 5)])
@pytest.mark.parametrize("masked", [True, False])
def test_query_heads_folded_into_rows_equal_grouped_attention(dtype, heads, groups, T, masked):
    g = torch.Generator().manual_seed(T)
    B, S, D = 3, 23, 16
    q = torch.randn(B, heads, T, D, generator=g).to(dtype)
    k, v = (torch.randn(B, groups, S, D, generator=g).to(dtype) for _ in range(2))
    mask = None
    if masked:
        mask = torch.rand(B, 1, T, S, generator=g) < 0.6
        mask[..., 0] = True
    folded = folded_sdpa(q, k, v, mask, D**-0.5)
    grouped = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D**-0.5, enable_gqa=True)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(folded, grouped, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mask_folded_once_gives_what_each_call_folding_it_gives(dtype):
    """``fold_mask`` (one additive mask for a forward's attention layers) is SDPA's own reading of the boolean
    mask: the outputs are bitwise those of folding it in the call."""
    g = torch.Generator().manual_seed(3)
    B, H, G, T, S, D = 2, 6, 2, 7, 19, 16
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k, v = (torch.randn(B, G, S, D, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(B, 1, T, S, generator=g) < 0.6
    mask[..., 0] = True
    folded = fold_mask(mask, H // G, dtype)
    assert folded.shape == (B, 1, 3 * T, S) and folded.dtype == dtype
    assert torch.equal(folded_sdpa(q, k, v, folded, D**-0.5), folded_sdpa(q, k, v, mask, D**-0.5))
    assert torch.equal(folded_sdpa(q, k, v, mask, D**-0.5), F.scaled_dot_product_attention(
        q.reshape(B, G, 3 * T, D), k, v, attn_mask=mask[:, :, None].expand(B, 1, 3, T, S).reshape(B, 1, 3 * T, S),
        scale=D**-0.5).view(B, H, T, D))


def test_a_forward_folds_its_mask_once_for_every_attention_layer(tmp_path, monkeypatch):
    import flare
    import flare.model.context as context
    from flare.decoding import SamplingParams
    from flare.engine import decode
    from flare.testing.checkpoints import save_tiny_checkpoint

    model = flare.load_model(save_tiny_checkpoint(tmp_path, "llama", seed=1, tokenizer=False), dtype=torch.bfloat16)
    model.config.mask_token_id = model.config.vocab_size - 1
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    want = decode(model, [[3, 5, 7], [4, 6]], params, "ar_trust:pause=0").token_ids
    calls = []
    monkeypatch.setattr(context, "fold_mask", lambda *a: calls.append(a) or fold_mask(*a))
    out = decode(model, [[3, 5, 7], [4, 6]], params, "ar_trust:pause=0")
    assert out.token_ids == want and model.config.num_hidden_layers == 4  # four attention layers, one fold each forward
    assert 0 < len(calls) <= out.forwards


def test_a_copied_context_folds_its_own_mask():
    """Every field given again (DDP copies a dataclass input so) or one replaced (a graph's buffers): the copy starts
    with no folded mask of the original's."""
    import dataclasses

    from flare.model.context import ForwardContext

    mask = torch.ones(1, 1, 2, 5, dtype=torch.bool).tril(3)
    ctx = ForwardContext("rows", None, mask)
    ctx.folded_mask(2, torch.float32)
    every = dataclasses.replace(ctx, **{f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)})
    other = dataclasses.replace(ctx, attn_mask=~mask)
    assert ctx.folded and not every.folded and not other.folded
    assert torch.equal(other.folded_mask(2, torch.float32), fold_mask(~mask, 2, torch.float32))


def test_attention_folds_only_a_few_grouped_rows_on_the_cpu():
    def fold(H, G, T, dtype=torch.bfloat16, keys=4, dims=8):
        return fold_groups(torch.zeros(1, H, T, dims, dtype=dtype), torch.zeros(1, G, keys, dims, dtype=dtype))

    assert fold(8, 2, 1) and fold(8, 2, FOLD_MAX_ROWS) and fold(8, 2, 7, torch.float32)
    assert not fold(8, 2, FOLD_MAX_ROWS + 1)  # a prefill
    assert not fold(8, 8, 1)  # no groups to fold
    assert not fold(8, 2, 1, torch.float32)  # fp32 single rows over few keys: the plain kernel is faster
    assert fold(8, 2, 1, torch.float32, keys=FP32_FOLD_MIN_KEYS_DIMS // 256, dims=256)


def test_attention_with_every_key_visible_equals_no_mask_when_folded():
    g = torch.Generator().manual_seed(1)
    B, S, H, G, D = 2, 11, 6, 2, 8
    q = torch.randn(B, 1, H, D, generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(B, S, G, D, generator=g, dtype=torch.bfloat16) for _ in range(2))
    out = attention(q, k, v, ALL_VISIBLE, D**-0.5)
    ref = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=D**-0.5, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-2, atol=1e-2)


def test_attention_path_names_the_call_attention_makes():
    q = torch.zeros(2, 7, 4, 8, dtype=torch.bfloat16)  # [B, T, H, D]
    k = torch.zeros(2, 9, 2, 8, dtype=torch.bfloat16)  # [B, S, G, D]
    mask = torch.ones(2, 1, 7, 9, dtype=torch.bool)
    assert attention_path(q, k, mask) == attention_path(q[:, :1], k, ALL_VISIBLE) == "sdpa_folded"
    assert attention_path(q, k, None) == "sdpa"  # plain causal (a prefill from nothing)
    assert attention_path(q.float()[:, :1], k.float(), ALL_VISIBLE) == "sdpa"  # fp32, one row, few keys
    assert attention_path(q, k.repeat(1, 1, 2, 1), mask) == "sdpa"  # no groups


@pytest.mark.parametrize("dtype, mode, path", [
    (torch.bfloat16, "causal", "sdpa_folded"),
    (torch.float32, "causal", "sdpa"),  # fp32 single rows over few keys: the plain call
    (torch.float32, "ar_trust:pause=0", "sdpa_folded"),  # a verify round's rows
])
def test_a_decode_reports_the_attention_path_it_ran(tmp_path, dtype, mode, path):
    import flare
    from flare.decoding import SamplingParams
    from flare.engine import decode
    from flare.testing.checkpoints import save_tiny_checkpoint

    model = flare.load_model(save_tiny_checkpoint(tmp_path, "qwen3_5", seed=1, tokenizer=False), dtype=dtype)
    model.config.mask_token_id = model.config.vocab_size - 1
    out = decode(model, [[3, 5, 7], [4, 6]], SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True), mode)
    assert out.kernel_paths["attention"] == path


@pytest.mark.parametrize("span", [1, 5, 24, 32])
def test_span_attention_equals_attention_over_the_whole_masked_capacity(span):
    """The key slots past ``span`` are masked for every row (as past the longest sequence in a compiled step): what
    they hold must not matter, and reading only the first ``span`` gives what reading all of them gives."""
    g = torch.Generator().manual_seed(span)
    B, T, H, G, D, S = 3, 4, 6, 2, 8, 32
    q, k, v = (torch.randn(B, n, h, D, generator=g) for n, h in ((T, H), (S, G), (S, G)))
    mask = torch.rand(B, 1, T, S, generator=g) < 0.7
    mask[..., 0] = True  # every row sees a key
    mask[..., span:] = False
    want = attention(q, k, v, mask, D**-0.5)
    k2, v2 = k.clone(), v.clone()
    k2[:, span:], v2[:, span:] = 1e4, float("nan")  # unread: changes nothing
    got = torch.ops.flare.span_attention(q, k2, v2, mask, torch.tensor([span]), D**-0.5)
    torch.testing.assert_close(got, want)
    assert got.is_contiguous()
