"""The pacer: AR-Trust batches without a seeded sampled sequence run whichever kind of round commits faster."""

from __future__ import annotations

import copy

import pytest

from flare.decoding import ArTrustOptions, SamplingParams
from flare.decoding.pacer import CAUSAL, EVERY, Pacer
from flare.engine import decode


def _drive(monkeypatch, seconds, accept, rounds: int, pacer: Pacer | None = None, sequences: int = 4,
           seed: int = 0) -> tuple[Pacer, list[int]]:
    """Kinds chosen over ``rounds`` rounds when a round of kind m takes ``seconds(m, i)`` (round i) and each of
    ``sequences`` sequences accepts draft k (after k-1) with chance ``accept(i)[k - 1]``."""
    import random

    rng = random.Random(seed)
    clock = [0.0]
    monkeypatch.setattr("flare.decoding.pacer.time.perf_counter", lambda: clock[0])
    pacer = pacer or Pacer(4)
    kinds = []
    for i in range(rounds):
        kind = pacer.next(sequences)
        kinds.append(kind)
        clock[0] += seconds(kind, i)
        if kind != CAUSAL:
            verdicts = []
            for _ in range(sequences):
                a = 0
                while a < kind and rng.random() < accept(i)[a]:
                    a += 1
                verdicts.append((kind, a))
            pacer.observe(verdicts)
    return pacer, kinds


def test_expected_tokens_per_round():
    pacer = Pacer(4)
    pacer.observe([(4, 4)] * 200)  # every draft passes
    assert pacer.tokens(CAUSAL) == 1.0 and 4.8 < pacer.tokens(4) <= 5.0 and 2.9 < pacer.tokens(2) <= 3.0
    pacer = Pacer(4)
    pacer.observe([(4, 0)] * 200)  # none does: a warm round and the cold one after it, one token each
    assert 1.0 <= pacer.tokens(4) < 1.01
    every = Pacer(4, every=True)
    every.observe([(3, 1)] * 400)  # draft 1 passes, draft 2 never
    assert abs(every.tokens(EVERY) - 2.0) < 0.01 and abs(every.acceptance(2)) < 0.01  # no cold rounds
    assert abs(every.tokens(4) - 1.5) < 0.01  # one group: a cold round of one token after each round of two
    assert every.acceptance(3) == every.acceptance(2)  # never verified after draft 2 passed: the prior


def test_acceptance_counts_only_the_drafts_a_round_reached():
    pacer = Pacer(4)
    pacer.observe([(2, 2), (4, 1), (3, 0)])
    assert pacer.tested[1:] == [3, 2, 0, 0] and pacer.passed[1:] == [2, 1, 0, 0]


def test_acceptance_is_learned_per_kind_of_drafts():
    """Drafts from a group of two MASK rows pass at draft 2 in 90% of rounds, from a group of four in 0%: each
    kind's expected tokens read its own drafts' acceptance, a kind not seen yet every kind's."""
    pacer = Pacer(4, every=True)
    verdicts = [(2, 2)] * 90 + [(2, 1)] * 10 + [(4, 1)] * 70 + [(4, 0)] * 30
    pacer.observe(verdicts, [2] * 100 + [4] * 100)
    assert pacer.acceptance(2, kind=2) > 0.85 and pacer.acceptance(2, kind=4) < 0.1
    assert 0.5 < pacer.acceptance(2) < 0.56  # every kind's: 90 of the 170 that verified draft 2 after draft 1
    assert pacer.acceptance(2, kind=3) == pacer.acceptance(2) == pacer.acceptance(2, kind=EVERY)  # none seen
    assert pacer.tokens(2) > pacer.tokens(4)
    pacer.observe([(4, 4)] * 50)  # makers not known: every kind's counts only
    assert pacer.made[4][0][1] < 100 < pacer.tested[1]


def test_the_kind_whose_own_drafts_pass_most_per_second_wins(monkeypatch):
    """Groups of four draft poorly at drafts 2 and 3 (each passes in half the rounds, draft 4 in 95%), groups of
    three well (95%): pooled, every kind reads both, the fourth draft looks nearly free and four drafts fastest;
    per kind, three drafts commit fastest (about 0.42 s per token against 0.70 for four, at 1.0 + 0.1 m s a
    round) and the pacer runs them from its first choice."""
    clock = [0.0]
    monkeypatch.setattr("flare.decoding.pacer.time.perf_counter", lambda: clock[0])
    four = [(4, 0)] * 40 + [(4, 1)] * 180 + [(4, 2)] * 90 + [(4, 3)] * 5 + [(4, 4)] * 85
    three = [(3, 0)] * 40 + [(3, 1)] * 18 + [(3, 2)] * 17 + [(3, 3)] * 325
    pooled, pacer = Pacer(4), Pacer(4)
    pooled.observe(four + three)
    pacer.observe(four + three, [4] * len(four) + [3] * len(three))
    for p in (pooled, pacer):
        for kind in (4, 3, CAUSAL):
            p.cost[kind].extend([1.0 + 0.1 * kind] * Pacer.WINDOW)
    assert pooled.rate(4) < pooled.rate(3)
    assert pacer.rate(3) < min(pacer.rate(k) for k in (4, 2, 1, CAUSAL)) and pacer.rate(4) > 1.5 * pacer.rate(3)
    assert [pacer.next(1) for _ in range(5)] == [3] * 5
    assert [pooled.next(1) for _ in range(5)] == [4] * 5


def test_verdicts_name_the_kind_whose_group_made_the_drafts(flare_models, monkeypatch):
    """The lane tells the pacer which kind of round drafted what each verify round checked: the round before it,
    or the drafting prefill (the longest group) for a sequence's first."""
    kinds, log = iter([3, 1, 1, 2, 3, 2, 1, 3] * 10), []

    def nxt(self, sequences, covered=None):
        log.append(("round", next(kinds)))
        return log[-1][1]

    observe = Pacer.observe
    monkeypatch.setattr(Pacer, "next", nxt)
    monkeypatch.setattr(Pacer, "observe", lambda self, verdicts, makers=None: log.append(("seen", makers))
                        or observe(self, verdicts, makers))
    from flare.decoding.ar_trust import ArTrustLane

    init = ArTrustLane.__init__  # no kind at first: the drafting prefill must name its own (the longest)
    monkeypatch.setattr(ArTrustLane, "__init__", lambda self, *a, **k: init(self, *a, **k) or setattr(
        self, "made_by", [None] * len(self.made_by)))
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    decode(flare_models["qwen3_5"], [[3, 1, 4, 1, 5]], params, ArTrustOptions(gen_block=4, redraft="last"))
    rounds, checked = [3], 0  # the drafting prefill's group: the longest, 3 drafts
    for what, value in log:
        if what == "round":
            rounds.append(value)
        elif value:
            assert value == [rounds[-2]], log
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("max_new, useful", [(10, 1), (11, 2), (13, 3)])
def test_drafts_past_the_end_of_an_output_count_as_rejected(flare_models, monkeypatch, max_new, useful):
    """A round whose accepted drafts run past the token that ends the output tells the pacer only the drafts up
    to that token passed: the rest commit nothing (here the length limit ends it; a stop token does the same,
    ``SlotBatch.emit``, tests/decoding/test_slots.py)."""
    import torch

    model = copy.deepcopy(flare_models["qwen3_5"])
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every row's logits tie: its argmax is token 0, so every draft passes
    seen, observe = [], Pacer.observe
    monkeypatch.setattr(Pacer, "next", lambda self, sequences, covered=None: 3)  # one group of 3 drafts always
    monkeypatch.setattr(Pacer, "observe", lambda self, verdicts, makers=None: seen.extend(verdicts)
                        or observe(self, verdicts, makers))
    # One token from the drafting prefill, then 4 a round: the third round needs max_new - 9 of its 4.
    params = SamplingParams(temperature=0, max_new_tokens=max_new, ignore_eos=True)
    res = decode(model, [[3, 1, 4, 1, 5]], params, ArTrustOptions(gen_block=4, redraft="last", pause=1))
    assert res.token_ids[0] == [0] * max_new
    assert seen == [(3, 3), (3, 3), (3, useful)], seen


def test_untimed_lengths_are_read_off_the_timed_ones(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("flare.decoding.pacer.time.perf_counter", lambda: clock[0])
    pacer = Pacer(5)
    pacer.cost[5].append(1.5), pacer.cost[2].append(1.0)  # seconds per sequence
    assert pacer.seconds(5) == 1.5 and pacer.seconds(2) == 1.0
    assert abs(pacer.seconds(3) - 1.5 * 1 / 3 - 1.0 * 2 / 3) < 1e-9 and abs(pacer.seconds(1) - 5 / 6) < 1e-9
    assert pacer.seconds(CAUSAL) is None


def test_a_round_with_an_admission_is_not_timed(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("flare.decoding.pacer.time.perf_counter", lambda: clock[0])
    pacer = Pacer(1)
    pacer.next(4)
    pacer.next(4)  # the first round of a kind is not timed; this one is
    clock[0] += 100.0  # a prefill inside the round
    pacer.skip()
    pacer.next(4)
    assert pacer.seconds(1) is None
    clock[0] += 2.0
    pacer.next(4)
    assert pacer.seconds(1) == 0.5


def test_a_burst_of_load_does_not_decide_the_race(monkeypatch):
    """Drafting at 1.2 s per round beats causal steps at 1.0 s (0.9 s per token, a close race: causal steps keep
    their trials); a few rounds slowed 20-fold by load from elsewhere (a shared CPU) move a kind's cost, the
    median of its last rounds, not at all: drafting keeps running."""
    best = []
    real_next = Pacer.next
    monkeypatch.setattr(Pacer, "next", lambda self, sequences, covered=None: real_next(self, sequences, covered)
                        if best.append(self.best) is None else None)
    slow = {30, 31, 33}
    pacer, kinds = _drive(monkeypatch, lambda m, i: (20.0 if i in slow else 1.0) * (1.2 if m else 1.0),
                          lambda i: [0.5], 60, Pacer(1))
    assert set(best) == {1} and abs(pacer.seconds(1) - 1.2 / 4) < 1e-9
    assert kinds[30:].count(CAUSAL) == Pacer.TRIAL  # one trial, as without the burst


def test_drafting_stays_while_it_commits_faster(monkeypatch):
    pacer, kinds = _drive(monkeypatch, lambda m, i: 1.4 if m else 1.0, lambda i: [0.9], 60, Pacer(1))
    assert kinds[:Pacer.FIRST] == [1] * Pacer.FIRST
    assert kinds[Pacer.FIRST:Pacer.FIRST + Pacer.TRIAL] == [CAUSAL] * Pacer.TRIAL  # the first trial
    assert kinds.count(CAUSAL) <= 4 * Pacer.TRIAL and kinds[-1] == 1


def test_causal_steps_take_over_when_drafts_do_not_pay(monkeypatch):
    pacer, kinds = _drive(monkeypatch, lambda m, i: 1.0 + 0.2 * m, lambda i: [0.05] * 4, 80)
    tail = kinds[30:]
    assert tail.count(CAUSAL) > 0.75 * len(tail)
    assert set(tail) - {CAUSAL}  # drafting is still tried now and then


def test_the_length_with_the_fewest_seconds_per_token_wins(monkeypatch):
    """Rows cost (1 + 0.1 m s per round) and the drafts far ahead rarely pass (0.9, 0.8, 0.3, 0.2): two drafts
    commit fastest (0.53 s per token against 0.61, 0.64, 0.71 and causal 1.0). It is found from acceptance
    seen in every round and costs on the line through the timed lengths; three drafts run only now and then,
    once what was seen of the third draft has faded."""
    pacer, kinds = _drive(monkeypatch, lambda m, i: 1.0 + 0.1 * m, lambda i: [0.9, 0.8, 0.3, 0.2], 300)
    assert pacer.best == 2 and kinds[-100:].count(2) > 90
    assert kinds[40:].count(3) < 10


def test_kinds_far_slower_per_token_are_not_tried_until_their_estimates_are_old(monkeypatch):
    """Rows cost little (1 + 0.1 m s a round) and drafts pass (0.9 each); a causal step costs 0.9 s. Once four
    and three drafts are timed, one draft is read off their line at about 1.4x four's seconds per token and gets
    no trial; causal steps, timed once (about 2x), get no more: the first ``LONGEST`` rounds try only the close
    kinds. Past ``LONGEST`` rounds without a trial a kind is tried again (its estimate may be stale)."""
    pacer, kinds = _drive(monkeypatch, lambda m, i: 1.0 + 0.1 * m if m else 0.9, lambda i: [0.9] * 4, 1200)
    head = kinds[:Pacer.LONGEST]
    assert head.count(1) == 0 and head.count(CAUSAL) == Pacer.TRIAL and head.count(3) >= Pacer.TRIAL
    assert pacer.rate(1) > Pacer.HOPELESS * pacer.rate(4) and pacer.rate(2) < Pacer.HOPELESS * pacer.rate(4)
    assert kinds.count(1) >= Pacer.TRIAL and kinds.count(CAUSAL) >= 2 * Pacer.TRIAL  # old estimates, tried again
    assert pacer.best == 4 and kinds.count(4) > 0.9 * len(kinds)


def test_costs_are_learned_per_size_class_of_batches(monkeypatch):
    """A round's cost per sequence depends on how many sequences it serves: drafting that loses at 16 sequences
    (rows cost there) and wins alone runs alone from the first round, not once the costs seen at 16 have faded;
    acceptance, the text's, is shared by every class."""
    accept = lambda i: [0.7] * 4  # noqa: E731
    pacer, _ = _drive(monkeypatch, lambda m, i: 3.0 if m else 1.0, accept, 200, Pacer(4), sequences=16)
    assert pacer.best == CAUSAL
    pacer, alone = _drive(monkeypatch, lambda m, i: 1.0 + 0.05 * m, accept, 60, pacer, sequences=1)
    assert alone[:Pacer.FIRST] == [4] * Pacer.FIRST  # this class's first kind, the longest, from its first round
    assert pacer.best != CAUSAL and alone[20:].count(CAUSAL) <= Pacer.TRIAL  # drafting won here
    assert sorted(pacer.races) == [0, 4] and pacer.races[4].best == CAUSAL
    assert abs(pacer.acceptance(1) - 0.7) < 0.1  # seen at both sizes


def test_a_size_class_starts_with_a_group_per_acceptance_point_where_that_is_a_kind(monkeypatch):
    """Before its trials, a class of one or two sequences runs EVERY (redraft=auto: no cold rounds, rows nearly
    free at that size); a class of more starts with a short length (half the longest: every draft costs a row
    per sequence), from the very first round. Without EVERY (redraft=last) one or two sequences start with the
    longest."""
    accept = lambda i: [0.7] * 4  # noqa: E731
    for sequences, first, every in ((1, EVERY, True), (2, EVERY, True), (4, 2, True), (16, 2, False),
                                    (2, 4, False), (1, 4, False)):
        _, kinds = _drive(monkeypatch, lambda m, i: 1.0, accept, 10, Pacer(4, every=every, every_slots=2),
                          sequences=sequences)
        assert kinds[:Pacer.FIRST] == [first] * Pacer.FIRST, sequences
    _, kinds = _drive(monkeypatch, lambda m, i: 1.0, accept, 10, Pacer(1), sequences=8)
    assert kinds[:Pacer.FIRST] == [1] * Pacer.FIRST  # one draft at most: the short length is the longest


@pytest.mark.parametrize("sequences", [1, 8])
def test_texts_that_draft_better_move_to_longer_rounds(monkeypatch, sequences):
    """The drafts far ahead start passing (new requests): what was seen of them fades while the short length
    runs, a longer length is tried and kept within some tens of rounds."""
    texts = lambda i: [0.9, 0.8, 0.3, 0.2] if i < 300 else [0.95] * 4  # noqa: E731
    pacer, kinds = _drive(monkeypatch, lambda m, i: 1.0 + 0.1 * m, texts, 600, sequences=sequences)
    assert kinds[200:300].count(2) > 90 and pacer.best == 4 and kinds[400:].count(4) > 190


@pytest.mark.parametrize("redraft", ["last", "every", "tree"])
def test_paced_rounds_keep_greedy_tokens_causal(flare_models, monkeypatch, redraft):
    """Whatever the pacer picks, greedy AR-Trust gives the causal tokens (here it alternates)."""
    flip = iter([True, False] * 100)
    monkeypatch.setattr(Pacer, "next", lambda self, sequences, covered=None: self.kinds[0] if next(flip) else CAUSAL)
    model = flare_models["qwen3_5"]
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    out = decode(model, prompts, params, ArTrustOptions(gen_block=4, redraft=redraft))
    assert out.token_ids == decode(model, prompts, params).token_ids
    assert out.forwards > 10  # both kinds ran


@pytest.mark.parametrize("seeds", [(1, 1), (1, None), (None, 2)])
def test_a_batch_with_a_seeded_sampled_sequence_is_not_paced(flare_models, monkeypatch, seeds):
    """A seeded request's draws must not depend on the clock: a round with a sampled sequence that draws from its
    own stream never asks the pacer (whatever else is in the batch)."""
    def refuse(self, sequences, covered=None):
        raise AssertionError("paced a round with a seeded sampled sequence")

    monkeypatch.setattr(Pacer, "next", refuse)
    model = flare_models["qwen3_5"]
    # (the seeded one decodes longest: once it ends, a batch without it may be paced)
    params = [SamplingParams(temperature=0.8, max_new_tokens=4 if seed is None else 12, ignore_eos=True, seed=seed)
              for seed in seeds]
    params.append(SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    out = decode(model, [[3, 1, 4], [1, 5], [2, 7]], params, ArTrustOptions(gen_block=4))
    assert [len(t) for t in out.token_ids] == [p.max_new_tokens for p in params]


def test_unseeded_sampled_batches_are_paced_by_a_pacer_of_their_own(flare_models, monkeypatch):
    """Unseeded sampled sequences draw from the process's stream, which promises no reproducible tokens: the clock
    may choose their rounds, with a pacer apart from greedy batches' (sampled drafts pass less often)."""
    asked, admitted = [], []
    next_kind, current = Pacer.next, Pacer.current
    monkeypatch.setattr(Pacer, "next", lambda self, *a: asked.append(self) or next_kind(self, *a))
    monkeypatch.setattr(Pacer, "current", lambda self, *a: admitted.append(self) or current(self, *a))
    model = copy.deepcopy(flare_models["qwen3_5"])
    mode = ArTrustOptions(gen_block=4)
    sampled = SamplingParams(temperature=0.8, max_new_tokens=12, ignore_eos=True)
    greedy = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)  # ends first
    out = decode(model, [[3, 1, 4], [1, 5]], [sampled, greedy], mode)
    assert [len(t) for t in out.token_ids] == [12, 4]
    pacers = {greedy: pacer for (_, greedy), pacer in model.pacing.items()}
    assert asked and set(asked) == {pacers[False]} and pacers[True] is not pacers[False]
    assert admitted and set(admitted) == {pacers[False]}  # the admission's MASK group: the sampled pacer's length
    decode(model, [[3, 1, 4]], greedy, mode)
    assert set(asked) == {pacers[False], pacers[True]}


def test_trials_that_confirm_the_faster_kind_grow_rarer(monkeypatch):
    """Drafting clearly faster: each causal trial that confirms it doubles the rounds to the next (up to
    LONGEST), so over a long run the trials cost a few percent of the rounds, not TRIAL / EVERY."""
    pacer, kinds = _drive(monkeypatch, lambda m, i: 1.4 if m else 1.0, lambda i: [0.9], 2000, Pacer(1))
    starts = [i for i in range(1, len(kinds)) if kinds[i] == CAUSAL and kinds[i - 1] == 1]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps == sorted(gaps) and gaps[-1] >= Pacer.LONGEST
    assert kinds.count(CAUSAL) < 0.05 * len(kinds)


def test_a_switch_brings_trials_back_to_every(monkeypatch):
    """After trials grew rare, drafts that stop paying are seen at once (acceptance is observed every round)
    and the switch brings the trials back to EVERY rounds apart."""
    best = []
    pacer = Pacer(1)
    real_next = Pacer.next

    def watched(self, sequences, covered=None):
        kind = real_next(self, sequences, covered)
        best.append((self.best, self.gap))
        return kind

    monkeypatch.setattr(Pacer, "next", watched)
    _drive(monkeypatch, lambda m, i: 1.4 if m else 1.0, lambda i: [0.9] if i < 700 else [0.02], 1000, pacer)
    assert best[699] == (1, Pacer.LONGEST)
    switched = next(i for i in range(700, 1000) if best[i][0] == CAUSAL)
    assert switched < 730 and best[switched][1] == Pacer.GAP


@pytest.mark.parametrize("gen_block", [3, 5])
def test_rounds_of_any_length_keep_greedy_tokens_causal(flare_models, monkeypatch, gen_block):
    """Rounds of every length between causal steps, in any order: the drafts a shorter round leaves are
    verified by a longer one only as far as they go, and the tokens stay the causal ones for a batch whose
    sequences accept different amounts."""
    from flare.decoding.ar_trust import ArTrustLane
    from flare.engine.runner import CachedRunner

    M = gen_block - 1
    order = iter([M, 1, 1, M, CAUSAL, M // 2 or 1, M, M, 1, CAUSAL, CAUSAL, max(1, M - 1)] * 20)
    monkeypatch.setattr(Pacer, "next", lambda self, sequences, covered=None: next(order))
    synced = ArTrustLane.synced
    # A random model accepts few drafts: no per-sequence pauses here, every round is the pacer's.
    monkeypatch.setattr(ArTrustLane, "synced", lambda self, values: synced(self, values) or self.pauses.left.__init__(
        [0] * len(self.pauses.left)))
    widths = []
    rows = CachedRunner.rows
    monkeypatch.setattr(CachedRunner, "rows", lambda self, t, *a, **k: widths.append(t.shape[1]) or rows(
        self, t, *a, **k))
    model = flare_models["qwen3_5"]
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    out = decode(model, prompts, params, ArTrustOptions(gen_block=gen_block, redraft="last"))
    assert out.token_ids == decode(model, prompts, params).token_ids
    assert {1 + 2 * m for m in range(1, M + 1)} <= set(widths)  # rounds of every length ran


def test_a_pacer_taken_up_again_does_not_time_its_first_round(flare_models, monkeypatch):
    """When a batch turns from sampled to greedy (its sampled sequence ended), the greedy pacer's first round is
    cold (the other pacer's rounds left no drafts it chose): it is not timed, as after any switch of kind."""
    calls = []
    next_kind = Pacer.next
    monkeypatch.setattr(Pacer, "next", lambda self, *a: calls.append((self, self.last)) or next_kind(self, *a))
    model = copy.deepcopy(flare_models["qwen3_5"])
    mode = ArTrustOptions(gen_block=4)
    greedy = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    decode(model, [[3, 1, 4]], greedy, mode)  # the greedy pacer has run a kind
    sampled = SamplingParams(temperature=0.8, max_new_tokens=4, ignore_eos=True)
    calls.clear()
    decode(model, [[3, 1, 4], [1, 5]], [greedy, sampled], mode)
    pacers = {greedy: pacer for (_, greedy), pacer in model.pacing.items()}
    kinds = [pacer is pacers[True] for pacer, _ in calls]
    assert kinds[0] is False and True in kinds  # sampled first, greedy once the sampled sequence ended
    assert calls[kinds.index(True)][1] is None


def test_what_the_pacer_learned_stays_with_the_model(flare_models):
    """A later batch in the same mode (another ``decode`` call or engine) starts from the pacers' estimates."""
    import copy

    model = copy.deepcopy(flare_models["llama"])
    assert not model.pacing
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    mode = ArTrustOptions(gen_block=4, redraft="last")
    decode(model, [[3, 1, 4]], params, mode)
    ((options, _), pacer), = [(key, pacer) for key, pacer in model.pacing.items() if key[1]]  # the greedy one
    seen = pacer.tested[1]
    assert options.gen_block == 4 and seen > 0
    decode(model, [[1, 5, 9]], params, mode)
    assert model.pacing[options, True] is pacer and pacer.tested[1] != seen


def test_a_group_per_acceptance_point_is_a_kind_where_rows_are_cheap(monkeypatch):
    """redraft=auto: EVERY (no cold rounds, more rows) against one group of each length. Rows nearly free (every
    round 1.05 s against 1.0 s): EVERY wins; rows costly (every 1.6 s): four drafts with one group win."""
    accept = lambda i: [0.7] * 4  # noqa: E731
    for every_cost, best in ((1.05, EVERY), (1.6, 4)):
        seconds = lambda m, i: {EVERY: every_cost, CAUSAL: 0.8}.get(m, 0.95 + 0.01 * m)  # noqa: E731
        pacer, kinds = _drive(monkeypatch, seconds, accept, 300, Pacer(4, every=True), sequences=1)
        assert pacer.best == best and kinds[-100:].count(best) > 90, (every_cost, pacer.best)


def test_a_group_per_acceptance_point_is_left_out_past_its_batch_limit(monkeypatch):
    """With ``every_slots`` EVERY is neither run nor tried while rounds serve more sequences (where its rows cost
    most), even when its estimate would win; at or below the limit it runs."""
    seconds = lambda m, i: {EVERY: 1.05, CAUSAL: 0.8}.get(m, 0.95 + 0.01 * m)  # noqa: E731
    accept = lambda i: [0.7] * 4  # noqa: E731
    for sequences, runs in ((3, False), (2, True)):
        pacer, kinds = _drive(monkeypatch, seconds, accept, 300, Pacer(4, every=True, every_slots=2),
                              sequences=sequences)
        assert (EVERY in kinds) == runs and (pacer.best == EVERY) == runs


@pytest.mark.parametrize("redraft", ["auto", "last", "every", "tree"])
def test_the_rounds_a_lane_may_be_paced_into(flare_models, redraft):
    model = flare_models["llama"]
    decode(model, [[3, 1, 4]], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True),
           ArTrustOptions(gen_block=4, redraft=redraft))
    assert {greedy for _, greedy in model.pacing} == {True, False}
    pacer = next(pacer for (_, greedy), pacer in model.pacing.items() if greedy)
    kinds = {"auto": (3, 2, 1, EVERY, CAUSAL), "last": (3, 2, 1, CAUSAL), "every": (EVERY, CAUSAL),
             "tree": (EVERY, CAUSAL)}
    assert pacer.kinds == kinds[redraft]
    assert pacer.every_slots == (2 if redraft == "auto" else None)


def test_a_group_per_acceptance_point_counts_the_slots_a_forward_covers():
    """A batch's last two sequences in slots 0 and 7 run forwards over 8 slots: EVERY is not a kind there (nor
    tried), however few sequences the round serves."""
    pacer = Pacer(4, every=True, every_slots=2)
    kinds = {pacer.next(2, covered=8) for _ in range(200)}
    assert EVERY not in kinds and {pacer.next(2, covered=2) for _ in range(Pacer.FIRST)} == {EVERY}


def test_which_classes_prefer_causal_steps(monkeypatch):
    pacer, _ = _drive(monkeypatch, lambda m, i: 3.0 if m else 1.0, lambda i: [0.3] * 4, 120, sequences=16)
    assert pacer.best == CAUSAL and pacer.prefers_causal(16) and pacer.prefers_causal(9)
    assert not pacer.prefers_causal(1) and not pacer.prefers_causal(8)  # classes never run: not known to


def test_an_admission_where_the_pacer_runs_causal_steps_is_prefilled_whole(flare_models, monkeypatch):
    """Where the pacer runs causal steps at the batch's size, drafts made at the admission would go unread: the
    prompts are prefilled whole, as causal decoding's, with no MASK rows and no rows forward, and the tokens and
    forwards are causal decoding's. A class still drafting, or a sampled batch, keeps the drafting prefill."""
    from flare.engine.runner import CachedRunner

    model = flare_models["qwen3_5"]
    ran = []
    rows, prefill = CachedRunner.rows, CachedRunner.prefill
    monkeypatch.setattr(CachedRunner, "rows", lambda self, *a, **k: ran.append("rows") or rows(self, *a, **k))
    monkeypatch.setattr(CachedRunner, "prefill", lambda self, tokens: ran.append([len(t) for t in tokens])
                        or prefill(self, tokens))
    monkeypatch.setattr(Pacer, "next", lambda self, sequences, covered=None: CAUSAL)
    monkeypatch.setattr(Pacer, "prefers_causal", lambda self, covered: True)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    causal = decode(model, prompts, params)
    ran.clear()
    out = decode(model, prompts, params, ArTrustOptions(gen_block=4))
    assert out.token_ids == causal.token_ids and out.forwards == causal.forwards
    assert ran == [[5, 2]]  # one plain prefill of the whole prompts, then causal steps
    ran.clear()
    sampled = SamplingParams(temperature=0.8, max_new_tokens=6, ignore_eos=True, seed=1)
    decode(model, prompts, sampled, ArTrustOptions(gen_block=4))
    assert ran[0] == "rows"  # not paced: the drafting prefill
    ran.clear()
    monkeypatch.setattr(Pacer, "prefers_causal", lambda self, covered: False)
    out = decode(model, prompts, params, ArTrustOptions(gen_block=4))
    assert out.token_ids == causal.token_ids and ran[0] == "rows"


def test_a_round_is_timed_in_the_class_it_ran_in(monkeypatch):
    """A round of 16 sequences that ends when a one-sequence round is chosen counts in the class of 16."""
    clock = [0.0]
    monkeypatch.setattr("flare.decoding.pacer.time.perf_counter", lambda: clock[0])
    pacer = Pacer(1)
    pacer.next(16)
    pacer.next(16)  # timed: the second of its kind in a row
    clock[0] += 8.0
    pacer.next(1)
    assert list(pacer.races[4].cost[pacer.races[4].best]) == [0.5] and not any(pacer.races[0].cost.values())


def test_a_round_costs_per_slot_its_forward_covers(monkeypatch):
    """Two sequences left in slots 0 and 7: the forward covers 8 slots, and its seconds count per covered slot
    (what a forward's cost follows), so that every kind's rounds compare alike however many answers ended."""
    clock = [0.0]
    monkeypatch.setattr("flare.decoding.pacer.time.perf_counter", lambda: clock[0])
    pacer = Pacer(1)
    pacer.next(2, covered=8)
    pacer.next(2, covered=8)  # timed
    clock[0] += 4.0
    pacer.next(8)
    assert list(pacer.races[3].cost[pacer.races[3].best]) == [0.5]


def test_sequences_admitted_whole_then_drafting_keep_causal_tokens(flare_models, monkeypatch):
    """Admitted whole (the pacer ran causal steps there), then drafting rounds: the first is cold, after the token
    the prefill gave, and every token stays causal decoding's, in a batch that also admits mid-way (Engine)."""
    from flare.engine import Engine, EngineConfig

    model = flare_models["qwen3_5"]
    monkeypatch.setattr(Pacer, "prefers_causal", lambda self, covered: True)
    monkeypatch.setattr(Pacer, "next", lambda self, sequences, covered=None: self.kinds[0])
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3]]
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    causal = decode(model, prompts, params).token_ids
    assert decode(model, prompts, params, ArTrustOptions(gen_block=4)).token_ids == causal
    engine = Engine(model, EngineConfig(max_num_seqs=2))  # the third request is admitted when a slot frees
    outs = engine.generate(prompts, params, ArTrustOptions(gen_block=4))
    assert [o.output_ids for o in outs] == causal


def test_the_kind_a_class_runs_now(monkeypatch):
    """``current``: a class not seen yet starts with its first kind (a group per acceptance point where that is a
    kind at its width, else the longest length, or half of it from ``WIDE`` slots); a class seen runs its choice."""
    pacer = Pacer(4, every=True, every_slots=2)
    assert pacer.current(1) == EVERY and pacer.current(2) == EVERY
    assert pacer.current(3) == 2 and pacer.current(16) == 2
    assert Pacer(4).current(2) == 4
    pacer, _ = _drive(monkeypatch, lambda m, i: 3.0 if m else 1.0, lambda i: [0.3] * 4, 120, sequences=16)
    assert pacer.current(16) == CAUSAL == pacer.best and pacer.prefers_causal(16) and not pacer.prefers_causal(1)


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_the_drafting_prefill_runs_the_mask_group_the_pacer_runs(flare_models, monkeypatch, family):
    """Where the pacer runs rounds of two drafts, an admission's drafting prefill runs a MASK group of two after
    each prompt (not M = 3), the first round verifies the two drafts it made as drafts of a group of two, and the
    tokens are causal decoding's. With a group per acceptance point (redraft=every), or sampled, the group is M."""
    from flare.engine.runner import CachedRunner

    model = flare_models[family]
    noisy, makers = [], []
    prefill_rows, observe = CachedRunner.prefill_rows, Pacer.observe
    monkeypatch.setattr(CachedRunner, "prefill_rows", lambda self, tokens, clean, n, filled: noisy.append(
        [int(x) for x in n]) or prefill_rows(self, tokens, clean, n, filled))
    monkeypatch.setattr(Pacer, "observe", lambda self, verdicts, made=None: makers.append(made) or observe(
        self, verdicts, made))
    monkeypatch.setattr(Pacer, "current", lambda self, covered: 2)
    monkeypatch.setattr(Pacer, "next", lambda self, sequences, covered=None: 2)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    causal = decode(model, prompts, params).token_ids
    out = decode(model, prompts, params, ArTrustOptions(gen_block=4, redraft="last"))
    assert out.token_ids == causal
    assert noisy == [[2, 2]] and makers[0] == [2, 2]
    noisy.clear()
    assert decode(model, prompts, params, ArTrustOptions(gen_block=4, redraft="every")).token_ids == causal
    assert noisy == [[3, 3]]
    noisy.clear()
    sampled = SamplingParams(temperature=0.8, max_new_tokens=6, ignore_eos=True, seed=1)
    decode(model, prompts, sampled, ArTrustOptions(gen_block=4, redraft="last"))
    assert noisy == [[3, 3]]


def test_a_machine_that_slows_down_keeps_the_fastest_kind(monkeypatch):
    """Every kind's rounds take twice as long from round 300 (a shared CPU's drift): the running kind's costs show
    it at once, the others' only at their next trials. Scaled by how the running kind's cost moved, the costs
    timed before still rank the kinds as they were, so the pacer keeps two drafts (the fastest at either speed,
    as in ``test_the_length_with_the_fewest_seconds_per_token_wins``), leaving it only for its trials, instead of
    chasing the kinds whose costs were timed on the faster machine (unscaled: 264 of 300 rounds of two drafts)."""
    accept = lambda i: [0.9, 0.8, 0.3, 0.2]  # noqa: E731
    pacer, kinds = _drive(monkeypatch, lambda m, i: (2.0 if i >= 300 else 1.0) * (1.0 + 0.1 * m), accept, 600)
    others = "".join("x" if k != 2 else "." for k in kinds[303:]).split(".")
    assert pacer.best == 2 and kinds[303:].count(2) > 0.95 * 297 and max(map(len, others)) <= Pacer.TRIAL
    assert abs(pacer.level() - 2.0) < 0.05
