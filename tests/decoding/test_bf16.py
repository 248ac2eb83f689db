"""Decoding in bf16: a verify row and a causal step agree within ``logit_tolerance``; greedy AR-Trust gives
the causal tokens on a trained checkpoint, and on a random one up to the first near-tie (two tokens closer
than the tolerance, where greedy may pick either). fp32 stays exact (tests/decoding/test_ar_trust.py)."""

from __future__ import annotations

import tempfile

import pytest
import torch

import flare
from flare.decoding import ArTrustOptions, SamplingParams
from flare.engine import decode
from flare.model.context import Rows
from flare.ops.precision import logit_tolerance
from flare.testing.checkpoints import save_tiny_checkpoint
from flare.testing.ties import divergences

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, vocab_size=512, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
             linear_key_head_dim=32, linear_value_head_dim=32)


@pytest.fixture(scope="module")
def bf16_model():
    with tempfile.TemporaryDirectory() as tmp:
        model = flare.load_model(save_tiny_checkpoint(tmp, "qwen3_5", seed=2, tokenizer=False, **SMALL),
                                 dtype=torch.bfloat16)
    model.config.mask_token_id = SMALL["vocab_size"] - 1
    return model.eval()


def test_tolerance_is_a_few_units_in_the_last_place():
    x = torch.tensor([[3.0, -1.0], [0.5, 0.25]])
    assert logit_tolerance(x.bfloat16()).tolist() == [4 * 2.0**-6, 4 * 2.0**-8]
    assert logit_tolerance(x).tolist() == pytest.approx([3e-4, 0.5e-4])


@pytest.mark.parametrize("N", [4, 7])
def test_verify_rows_match_causal_steps_within_the_tolerance(bf16_model, N):
    model, B, P = bf16_model, 8, 20
    ids = torch.randint(0, SMALL["vocab_size"] - 1, (B, P + N), generator=torch.Generator().manual_seed(N))
    with torch.no_grad():
        steps_cache, rows_cache = model.new_cache(B), model.new_cache(B)
        model.hidden_states(ids[:, :P], cache=steps_cache)
        model.hidden_states(ids[:, :P], cache=rows_cache)
        steps = torch.cat([model.logits(model.hidden_states(ids[:, P + i:P + i + 1], cache=steps_cache))
                           for i in range(N)], 1)
        rows = model.logits(model.hidden_states(ids[:, P:], cache=rows_cache, layout=Rows(N)))
    finite = torch.isfinite(steps)  # the [MASK] row is -inf in both
    assert torch.equal(finite, torch.isfinite(rows))
    gap = torch.where(finite, rows.float() - steps.float(), 0.0).abs().amax(-1)
    assert (gap <= logit_tolerance(steps)).all(), (gap.max(), logit_tolerance(steps).min())


@pytest.mark.parametrize("redraft", ["last", "every", "tree"])
def test_greedy_ar_trust_is_causal_up_to_the_first_near_tie(bf16_model, redraft):
    model = bf16_model
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, SMALL["vocab_size"] - 1, (n,), generator=g).tolist() for n in (3, 11, 25, 6)]
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    causal = decode(model, prompts, params)
    trust = decode(model, prompts, params, ArTrustOptions(redraft=redraft))
    parted = divergences(model, prompts, causal.token_ids, trust.token_ids)
    assert all(tie for _, tie in parted), parted
