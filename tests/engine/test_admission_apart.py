"""Admissions beside running sequences prefill their own slots apart (``CachedRunner.apart``): the same tokens."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import flare.engine.runner as runner
from flare.decoding import SamplingParams, make_options
from flare.engine import Engine, EngineConfig

APART = runner.CachedRunner.apart


def _run(model, requests, compact_rows, monkeypatch):
    monkeypatch.setattr(runner, "COMPACT_ROWS", compact_rows)
    calls = []

    def counted(self, slots, rows):
        calls.append(list(slots))
        return APART(self, slots, rows)

    monkeypatch.setattr(runner.CachedRunner, "apart", counted)
    engine = Engine(model, EngineConfig(max_num_seqs=4, prefix_cache_mb=0))
    seqs = [engine.add_request(p, params, make_options(mode, options)) for p, params, mode, options in requests]
    while engine.has_work:
        engine.step()
    return [s.output_ids for s in seqs], calls


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_admissions_apart_decode_as_admissions_over_every_slot(flare_models, family, monkeypatch):
    """Requests of several modes and lengths through 4 slots, so that most are admitted while others run (the
    drafting prefill of AR-Trust and the plain one both): prefilled apart or over every slot, the same tokens."""
    model = copy.deepcopy(flare_models[family]).to(torch.float64)  # to round-off: no greedy tie can flip
    rng = random.Random(2)
    kinds = [("ar_trust", {}), ("causal", {}), ("ar_trust", {"redraft": "every"}), ("diffusion_trust", {})]
    requests = []
    for i in range(10):
        mode, options = kinds[i % len(kinds)]
        params = SamplingParams(temperature=0, max_new_tokens=rng.randrange(2, 14))
        requests.append(([rng.randrange(90) for _ in range(rng.randrange(5, 30))], params, mode, options))
    whole, none = _run(model, requests, 1 << 30, monkeypatch)
    apart, calls = _run(model, requests, 1, monkeypatch)
    assert not none and whole == apart
    assert len(calls) >= 4 and any(len(c) == 1 and c[0] > 0 for c in calls)  # alone, in a slot past the first


def test_the_cache_free_reference_drafts_beside_a_long_prompt(flare_models):
    """A drafting prefill of a slot beside a lower one whose prompt is too long to draft (``DRAFTING_PREFILL_WORK``):
    the reference runner (no caches, nothing to run apart) gives the cached runner's tokens."""
    from flare.engine import decode

    model = copy.deepcopy(flare_models["qwen3_5"]).to(torch.float64)
    rng = random.Random(4)
    prompts = [[rng.randrange(90) for _ in range(300)], [rng.randrange(90) for _ in range(10)]]
    params = SamplingParams(temperature=0, max_new_tokens=6)
    want = decode(model, prompts, params, "ar_trust").token_ids
    assert decode(model, prompts, params, "ar_trust", reference=True).token_ids == want
