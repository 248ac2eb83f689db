"""Causal decoding: greedy equals transformers' generate and the no-cache reference; sampling is seeded."""

from __future__ import annotations

import pytest
import torch

from flare.decoding import SamplingParams
from flare.engine import decode
from flare.testing.checkpoints import FAMILIES


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate(tiny_models, family):
    model, ref = tiny_models[family]
    prompts = _prompts(model.config.vocab_size, [1, 7, 33])
    params = SamplingParams(temperature=0, max_new_tokens=24)
    ours = decode(model, prompts, params)
    eos = set(model.config.eos_token_ids)
    for prompt, tokens in zip(prompts, ours.token_ids):
        with torch.no_grad():
            hf = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
        cut = next((i + 1 for i, t in enumerate(hf) if t in eos), len(hf))
        assert tokens == hf[:cut]
    assert ours.tokens_per_forward == 1.0


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next", "llama"])
def test_cached_equals_reference_and_batch_equals_alone(tiny_models, family):
    model, _ = tiny_models[family]
    prompts = _prompts(model.config.vocab_size, [5, 19, 2, 11], seed=3)
    params = SamplingParams(temperature=0, max_new_tokens=16)
    batched = decode(model, prompts, params)
    assert batched.token_ids == decode(model, prompts, params, reference=True).token_ids
    for prompt, tokens in zip(prompts, batched.token_ids):
        assert decode(model, [prompt], params).token_ids[0] == tokens


def test_stop_tokens_end_each_row(tiny_models):
    model, _ = tiny_models["qwen3_5"]
    prompts = _prompts(model.config.vocab_size, [4, 9], seed=5)
    free = decode(model, prompts, SamplingParams(temperature=0, max_new_tokens=12))
    stop = free.token_ids[0][3]
    out = decode(model, prompts, SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[stop]))
    assert out.token_ids[0] == free.token_ids[0][: free.token_ids[0].index(stop) + 1]
    assert out.finish_reasons[0] == "stop"
    stopping = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[stop])
    assert out.token_ids == decode(model, prompts, stopping, reference=True).token_ids


def test_sampling_is_seeded_and_matches_reference(tiny_models):
    model, _ = tiny_models["qwen3_5"]
    prompts = _prompts(model.config.vocab_size, [6])
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_new_tokens=20, seed=7)
    a, b = decode(model, prompts, params), decode(model, prompts, params)
    assert a.token_ids == b.token_ids
    assert a.token_ids == decode(model, prompts, params, reference=True).token_ids
    other = decode(model, prompts, SamplingParams(temperature=0.9, max_new_tokens=20, seed=8))
    assert other.token_ids != a.token_ids


@pytest.mark.parametrize(
    "prompts, params, message",
    [
        ([[]], SamplingParams(), "empty"),
        ([[1, 10_000]], SamplingParams(), "outside the vocabulary"),
        ([[-1]], SamplingParams(), "outside the vocabulary"),
        ([], SamplingParams(), "no prompts"),
    ],
)
def test_bad_prompts(tiny_models, prompts, params, message):
    model, _ = tiny_models["qwen3_5"]
    with pytest.raises(ValueError, match=message):
        decode(model, prompts, params)


def test_unknown_mode(tiny_models):
    with pytest.raises(ValueError, match="unknown decoding mode"):
        decode(tiny_models["llama"][0], [[1]], SamplingParams(), mode="beam")


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5), dict(max_new_tokens=0)]
)
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_params_per_prompt_are_each_prompts_own(tiny_models):
    """``decode`` with one sampling params per prompt: each prompt decodes as it would alone with its own (a
    length, a seeded stream of its own); a list of the wrong length is an error that names both counts."""
    model, _ = tiny_models["qwen3_5"]
    prompts = _prompts(model.config.vocab_size, [5, 9, 3], seed=11)
    each = [SamplingParams(temperature=0, max_new_tokens=9, ignore_eos=True),
            SamplingParams(temperature=0.9, top_k=20, max_new_tokens=4, seed=3, ignore_eos=True),
            SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)]
    out = decode(model, prompts, each)
    assert [len(t) for t in out.token_ids] == [9, 4, 1]
    for prompt, params, tokens in zip(prompts, each, out.token_ids):
        assert decode(model, [prompt], params).token_ids[0] == tokens
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        decode(model, prompts, each[:2])
