"""The batched sampler: filters, greedy rows, seeded draws that follow the distribution."""

from __future__ import annotations

import pytest
import torch

from flare.ops.sampling import argmax, draw, filtered_probs, sample


def _rows(n, t=1.0, k=0, p=1.0):
    return torch.full((n,), float(t)), torch.full((n,), k, dtype=torch.long), torch.full((n,), float(p))


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    probs = filtered_probs(logits, *_rows(1, k=2))
    torch.testing.assert_close(probs, torch.tensor([[0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]]))
    probs = filtered_probs(logits, *_rows(1, p=0.8))  # 0.5 + 0.2 < 0.8, so the third token is needed too
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    probs = filtered_probs(logits, *_rows(1, p=0.01))  # never empty: the top token always stays
    torch.testing.assert_close(probs, torch.tensor([[1.0, 0, 0, 0, 0]]))


def test_rows_use_their_own_settings_and_temperature_zero_is_argmax():
    logits = torch.randn(3, 50)
    temp = torch.tensor([0.0, 1.0, 2.0])
    probs = filtered_probs(logits, temp, torch.tensor([0, 5, 0]), torch.tensor([1.0, 1.0, 1.0]))
    assert probs[0].argmax() == logits[0].argmax() and probs[0].max() == 1.0
    assert (probs[1] > 0).sum() == 5
    torch.testing.assert_close(probs[2], torch.softmax(logits[2] / 2, -1))
    assert torch.equal(sample(logits, temp * 0, *_rows(3)[1:]), logits.argmax(-1))


def test_draws_follow_the_distribution():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    draws = draw(p.expand(n, 4).contiguous(), gen)
    freq = torch.bincount(draws, minlength=4).float() / n
    assert (freq - p).abs().max() < 0.01
    again = draw(p.expand(n, 4).contiguous(), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 7), (72, 4099), (3, 2, 1000), (5, 1), (2, 1024), (2, 3, 1537), (9, 49153)])
def test_argmax_equals_torch_argmax_ties_included(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    for high in (2, 5, 1000):  # few distinct values: many tied maxima, the first must win as in argmax
        x = torch.randint(0, high, shape, generator=g).to(dtype)
        x[..., -1] = float("-inf")
        assert torch.equal(argmax(x), x.argmax(-1))
        strided = x.transpose(0, -1).contiguous().transpose(0, -1)
        assert torch.equal(argmax(strided), x.argmax(-1))
