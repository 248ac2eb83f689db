"""Masked grouped-query attention: expanding the key/value heads (what CUDA runs, so that a fused kernel takes
the mask) equals the grouped path, and on CUDA no masked call falls back to SDPA's math kernel."""

from __future__ import annotations

import pytest
import torch

from flare.ops.attention import attention, masked_sdpa


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
