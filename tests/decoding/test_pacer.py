"""The pacer: all-greedy AR-Trust batches run whichever of drafting rounds and causal steps commits faster."""

from __future__ import annotations

import pytest

from flare.decoding import ArTrustOptions, SamplingParams
from flare.decoding.pacer import CAUSAL, DRAFT, SHORT, Pacer
from flare.engine import decode


def _drive(monkeypatch, seconds: dict[str, float], tokens: dict[str, int], rounds: int) -> list[str]:
    """Kinds chosen over ``rounds`` rounds when a round of each kind takes ``seconds[kind]`` and commits
    ``tokens[kind]``."""
    clock = [0.0]
    monkeypatch.setattr("flare.decoding.pacer.time.perf_counter", lambda: clock[0])
    pacer, kinds, last = Pacer(), [], None
    for _ in range(rounds):
        kind = pacer.next(last)
        kinds.append(kind)
        clock[0] += seconds[kind]
        last = tokens[kind]
    return kinds


def test_drafting_stays_while_it_commits_faster(monkeypatch):
    kinds = _drive(monkeypatch, {DRAFT: 2.0, CAUSAL: 1.0}, {DRAFT: 3, CAUSAL: 1}, 60)
    assert kinds[:Pacer.FIRST] == [DRAFT] * Pacer.FIRST
    assert kinds[Pacer.FIRST:Pacer.FIRST + Pacer.TRIAL] == [CAUSAL] * Pacer.TRIAL  # the first trial
    assert kinds.count(CAUSAL) <= 4 * Pacer.TRIAL and kinds[-1] == DRAFT


def test_causal_steps_take_over_when_drafts_do_not_pay(monkeypatch):
    kinds = _drive(monkeypatch, {DRAFT: 2.0, CAUSAL: 1.0}, {DRAFT: 1, CAUSAL: 1}, 60)
    tail = kinds[20:]
    assert tail.count(CAUSAL) > 0.75 * len(tail)
    assert DRAFT in tail  # drafting is still tried now and then


def test_a_round_with_an_admission_is_not_timed(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("flare.decoding.pacer.time.perf_counter", lambda: clock[0])
    pacer = Pacer()
    pacer.next(None)
    pacer.next(1)  # the first round of a kind is not timed; this one is
    clock[0] += 100.0  # a prefill inside the round
    pacer.skip()
    pacer.next(1)
    assert pacer.rate(DRAFT) is None
    clock[0] += 2.0
    pacer.next(4)
    assert pacer.rate(DRAFT) == 0.5


@pytest.mark.parametrize("redraft", ["last", "every"])
def test_paced_rounds_keep_greedy_tokens_causal(flare_models, monkeypatch, redraft):
    """Whatever the pacer picks, greedy AR-Trust gives the causal tokens (here it alternates)."""
    flip = iter([DRAFT, CAUSAL] * 100)
    monkeypatch.setattr(Pacer, "next", lambda self, tokens: next(flip))
    model = flare_models["qwen3_5"]
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    out = decode(model, prompts, params, ArTrustOptions(gen_block=4, redraft=redraft))
    assert out.token_ids == decode(model, prompts, params).token_ids
    assert out.forwards > 10  # both kinds ran


def test_a_batch_with_sampled_sequences_is_not_paced(flare_models, monkeypatch):
    """Sampled draws must not depend on the clock: a round with any sampled sequence never asks the pacer."""
    def refuse(self, tokens):
        raise AssertionError("paced a sampled round")

    monkeypatch.setattr(Pacer, "next", refuse)
    model = flare_models["qwen3_5"]
    params = SamplingParams(temperature=0.8, max_new_tokens=12, ignore_eos=True, seed=1)
    out = decode(model, [[3, 1, 4], [1, 5]], params, ArTrustOptions(gen_block=4))
    assert len(out.token_ids[0]) == 12


def test_trials_that_confirm_the_faster_kind_grow_rarer(monkeypatch):
    """Drafting clearly faster: each causal trial that confirms it doubles the rounds to the next (up to
    LONGEST), so over a long run the trials cost a few percent of the rounds, not TRIAL / EVERY."""
    kinds = _drive(monkeypatch, {DRAFT: 2.0, CAUSAL: 1.0}, {DRAFT: 3, CAUSAL: 1}, 2000)
    starts = [i for i in range(1, len(kinds)) if kinds[i] == CAUSAL and kinds[i - 1] == DRAFT]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps == sorted(gaps) and gaps[-1] >= Pacer.LONGEST
    assert kinds.count(CAUSAL) < 0.05 * len(kinds)


def test_a_switch_brings_trials_back_to_every(monkeypatch):
    """After trials grew rare, drafts that stop paying are seen at once (the running kind is timed every round)
    and the switch brings the trials back to EVERY rounds apart."""
    clock = [0.0]
    monkeypatch.setattr("flare.decoding.pacer.time.perf_counter", lambda: clock[0])
    pacer, best, last = Pacer(), [], None
    for i in range(1000):
        kind = pacer.next(last)
        best.append((pacer.best, pacer.gap))
        clock[0] += {DRAFT: 2.0, CAUSAL: 1.0}[kind]
        last = {DRAFT: 3 if i < 700 else 1, CAUSAL: 1}[kind]  # drafts stop paying after round 700
    assert best[699] == (DRAFT, Pacer.LONGEST)
    switched = next(i for i in range(700, 1000) if best[i][0] == CAUSAL)
    assert switched < 710 and best[switched][1] == Pacer.EVERY


@pytest.mark.parametrize("gen_block", [3, 5])
def test_short_rounds_keep_greedy_tokens_causal(flare_models, monkeypatch, gen_block):
    """Short rounds (fewer drafts and MASK rows) between full ones and causal steps, in any order: the drafts a
    short round leaves are verified by a longer one only as far as they go, and the tokens stay the causal ones
    for a batch whose sequences accept different amounts."""
    from flare.engine.runner import CachedRunner

    order = iter([DRAFT, SHORT, SHORT, DRAFT, CAUSAL, SHORT, DRAFT, DRAFT, SHORT, CAUSAL, CAUSAL] * 20)
    monkeypatch.setattr(Pacer, "next", lambda self, tokens: next(order))
    widths = []
    rows = CachedRunner.rows
    monkeypatch.setattr(CachedRunner, "rows", lambda self, t, *a, **k: widths.append(t.shape[1]) or rows(
        self, t, *a, **k))
    model = flare_models["qwen3_5"]
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    out = decode(model, prompts, params, ArTrustOptions(gen_block=gen_block, redraft="last"))
    assert out.token_ids == decode(model, prompts, params).token_ids
    M = gen_block - 1
    assert {1 + 2 * M, 1 + 2 * (M // 2)} <= set(widths)  # full and short rounds both ran


def test_a_pacer_over_three_kinds_tries_each_and_keeps_the_fastest(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("flare.decoding.pacer.time.perf_counter", lambda: clock[0])
    seconds, tokens = {DRAFT: 2.0, SHORT: 1.2, CAUSAL: 1.0}, {DRAFT: 2.4, SHORT: 1.8, CAUSAL: 1}
    pacer, kinds, last = Pacer((DRAFT, SHORT, CAUSAL)), [], None
    for _ in range(300):
        kind = pacer.next(last)
        kinds.append(kind)
        clock[0] += seconds[kind]
        last = tokens[kind]
    assert kinds[Pacer.FIRST:Pacer.FIRST + Pacer.TRIAL] == [SHORT] * Pacer.TRIAL  # untried kinds first
    assert CAUSAL in kinds[:40]
    assert pacer.best == SHORT and kinds[-50:].count(SHORT) > 40  # 0.67 s per token against 0.83 and 1.0
