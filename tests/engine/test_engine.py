"""The engine: a request alone == the same request inside a busy mixed-mode batch; slots, limits, aborts."""

from __future__ import annotations

import random

import pytest

from flare.decoding import SamplingParams, make_options
from flare.engine import Engine, EngineConfig, QueueFull, RequestError, decode

MIXED = [
    ("causal", {}),
    ("ar_trust", {}),
    ("ar_trust", {"gen_block": 3}),
    ("ar_trust", {"redraft": "every"}),
    ("ar_trust", {"redraft": "tree"}),
    ("diffusion_trust", {}),
    ("diffusion_trust", {"lookahead": 1}),
    ("low_confidence", {}),
    ("llada", {"block_size": 8, "steps": 4}),
]


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(90) for _ in range(n)]


def _run(engine: Engine, requests):
    """Submit all, step to the end, return each request's streamed tokens and final tokens."""
    seqs, streamed = [], {}
    for prompt, params, mode, options in requests:
        seqs.append(engine.add_request(prompt, params, make_options(mode, options)))
        streamed[seqs[-1].request_id] = []
    while engine.has_work:
        for out in engine.step():
            streamed[out.request_id] += out.new_token_ids
    return [(streamed[s.request_id], s.output_ids, s.finish_reason) for s in seqs]


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_a_request_alone_equals_it_inside_a_busy_mixed_batch(flare_models, family):
    model = flare_models[family]
    rng = random.Random(0)
    requests = []
    for i in range(14):
        mode, options = MIXED[i % len(MIXED)]
        params = SamplingParams(temperature=0, max_new_tokens=rng.randrange(3, 17))
        requests.append((_prompt(rng, rng.randrange(1, 20)), params, mode, options))
    busy = _run(Engine(model, EngineConfig(max_num_seqs=6)), requests)
    for req, got in zip(requests, busy):
        alone = _run(Engine(model, EngineConfig(max_num_seqs=2)), [req])[0]
        assert got == alone, req[2:]
        prompt, params, mode, options = req
        assert got[1] == decode(model, [prompt], params, make_options(mode, options)).token_ids[0]
        assert got[0] == got[1]  # the stream is exactly the committed output


def test_seeded_sampling_does_not_depend_on_the_batch(flare_models):
    model = flare_models["qwen3_5"]
    rng = random.Random(1)
    target = ([5, 6, 7], SamplingParams(temperature=0.9, top_k=20, max_new_tokens=12, seed=7), "ar_trust", {})
    others = [(_prompt(rng, 6), SamplingParams(temperature=1.0, max_new_tokens=9, seed=i), m, o)
              for i, (m, o) in enumerate(MIXED)]
    alone = _run(Engine(model), [target])[0]
    busy = _run(Engine(model, EngineConfig(max_num_seqs=4)), others[:3] + [target] + others[3:])[3]
    assert alone == busy


def test_slots_are_freed_and_queue_limits_hold(flare_models):
    model = flare_models["qwen3_5"]
    engine = Engine(model, EngineConfig(max_num_seqs=2, max_waiting=3))
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    ids = [engine.add_request([1, 2, 3], params, "ar_trust").request_id for _ in range(3)]
    with pytest.raises(QueueFull):
        engine.add_request([1], params)
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1 and engine.free_slots == 0
    assert engine.abort(ids[0]) and engine.free_slots == 1
    assert engine.abort(ids[2])  # still waiting
    assert not engine.abort(ids[0]) and not engine.abort("nope")
    while engine.has_work:
        engine.step()
    assert engine.free_slots == 2 and engine.stats.requests_finished == 1 and engine.stats.requests_aborted == 2
    # A freed slot serves the next request exactly as a fresh engine would.
    again = _run(engine, [([4, 5], SamplingParams(temperature=0, max_new_tokens=6), "diffusion_trust", {})])
    fresh = _run(Engine(model), [([4, 5], SamplingParams(temperature=0, max_new_tokens=6), "diffusion_trust", {})])
    assert again == fresh


@pytest.mark.parametrize("prompt, params, mode, message", [
    ([], SamplingParams(), "causal", "empty"),
    ([1, 500], SamplingParams(), "causal", "outside the vocabulary"),
    ([1], SamplingParams(), "turbo", "unknown decoding mode"),
    ([1], SamplingParams(), "ar_trust:block_size=3", "takes options"),
    ([1], SamplingParams(), "ar_trust:gen_block=1", "gen_block"),
    ([1] * 40, SamplingParams(), "causal", "at most 32"),
    ([1], SamplingParams(max_new_tokens=99), "causal", "limit 64"),
])
def test_bad_requests_are_refused_clearly(flare_models, prompt, params, mode, message):
    engine = Engine(flare_models["qwen3_5"], EngineConfig(max_prompt_tokens=32, max_new_tokens=64))
    with pytest.raises(RequestError, match=message):
        engine.add_request(prompt, params, mode)
    assert not engine.has_work


def test_parallel_modes_need_a_flare_checkpoint(tiny_models):
    engine = Engine(tiny_models["qwen3_5"][0])
    with pytest.raises(RequestError, match="mask token"):
        engine.add_request([1], SamplingParams(), "ar_trust")


def test_stats_count_tokens_and_forwards(flare_models):
    model = flare_models["llama"]
    engine = Engine(model)
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    prompts = [[1, 2], [3, 4, 5]]
    mode = make_options("ar_trust", {"pause": 0})  # always drafting: the pacer's choices follow the clock
    engine.generate(prompts, params, mode)
    assert engine.stats.tokens == 16 and engine.stats.finished_tokens == 16
    # Each request alone, decoded directly: both requests run from the first step, so the engine runs as many
    # forwards as the longer one needs; each request takes part in as many forwards, and drafts and accepts as
    # many tokens, as it does alone.
    alone = [decode(model, [p], params, mode) for p in prompts]
    assert engine.stats.forwards == max(a.forwards for a in alone)
    assert engine.stats.active_forwards == sum(a.forwards for a in alone)
    assert engine.stats.drafted == sum(a.drafted for a in alone)
    assert engine.stats.accepted == sum(a.accepted for a in alone)
    assert 0 < engine.stats.accepted < engine.stats.drafted  # partial acceptance: the counts are exercised
    assert engine.free_slots == 16


def test_requests_time_their_first_output_and_the_tokens_after_it(flare_models, monkeypatch):
    """TTFT: arrival to the step that first showed tokens; TPOT: (end - first output) / the tokens after it."""
    clock = [0.0]
    monkeypatch.setattr("flare.engine.engine.time.perf_counter", lambda: clock[0])
    engine = Engine(flare_models["llama"])
    long = engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True), "causal")
    one = engine.add_request([4, 5], SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True), "causal")
    assert long.ttft is None and long.tpot is None
    steps = 0
    while engine.has_work:
        clock[0] += 0.5  # every step ends half a second later
        engine.step()
        steps += 1
    # Causal: the prefill's token and the first step's in the first step's outputs, one token per step after.
    assert steps == 5 and long.ttft == 0.5 and long.first_output == 2 and long.tpot == 0.5
    assert one.ttft == 0.5 and one.tpot is None  # one token: nothing after the first output
    aborted = engine.add_request([1, 2], SamplingParams(temperature=0, max_new_tokens=6), "causal")
    engine.abort(aborted.request_id)
    assert aborted.ttft is None and aborted.tpot is None


def test_a_lone_request_in_a_wide_engine_steps_without_masks(flare_models, monkeypatch):
    """The host knows each slot's length after every read: a causal step over slots that all have the same
    length (here the one busy slot of eight) writes one range of KV slots and builds no attention mask, as
    decode() of that request alone does; and gives the same tokens."""
    import flare.masks as masks

    model = flare_models["qwen3_5"]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    prompt = _prompt(random.Random(5), 9)
    engine = Engine(model, EngineConfig(max_num_seqs=8))
    seq = engine.add_request(prompt, params, make_options("causal", {}))
    engine.step()  # admission prefill and the first step
    built = []
    monkeypatch.setattr(masks, "materialize", lambda *a, **k: built.append(a))
    while engine.has_work:
        engine.step()
    monkeypatch.undo()
    assert not built
    assert seq.output_ids == decode(model, [prompt], params).token_ids[0]


@pytest.mark.parametrize("mode, options", [("causal", {}), ("ar_trust", {"pause": 0}),
                                           ("ar_trust", {"redraft": "every", "pause": 0})])
def test_the_lm_head_reads_only_the_busy_slots(flare_models, mode, options):
    """The LM head (the largest matrix of a real model) runs over the rows of the slots a forward covered: one
    request in an engine of eight slots pays for its own rows alone, prefill included, and gets the tokens
    decode() gives it."""
    model = flare_models["qwen3_5"]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    prompt = _prompt(random.Random(6), 9)
    engine = Engine(model, EngineConfig(max_num_seqs=8))
    slots = []
    hook = model.lm_head.register_forward_pre_hook(lambda m, args: slots.append(args[0].shape[0]))
    try:
        seq = engine.add_request(prompt, params, make_options(mode, options))
        while engine.has_work:
            engine.step()
    finally:
        hook.remove()
    assert slots and set(slots) == {1}
    assert seq.output_ids == decode(model, [prompt], params, make_options(mode, options)).token_ids[0]


def test_forgetting_the_pacing_makes_lanes_afresh_and_waits_for_running_sequences(flare_models):
    model = flare_models["qwen3_5"]
    engine = Engine(model, EngineConfig(max_num_seqs=2))
    params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    engine.generate([[3, 4, 5]], params, "ar_trust")
    (pacer,) = [lane.pacer for lane in engine.stepper.lanes.values()]
    engine.add_request([3, 4, 5], params, "ar_trust")
    engine.step()
    with pytest.raises(RuntimeError, match="sequences are decoding"):
        engine.stepper.forget_pacing()
    while engine.has_work:
        engine.step()
    engine.stepper.forget_pacing()
    assert not engine.stepper.lanes and not model.pacing
    engine.generate([[3, 4, 5]], params, "ar_trust")
    assert [lane.pacer is pacer for lane in engine.stepper.lanes.values()] == [False]


def test_a_paced_tree_beside_another_lanes_rows_commits_its_causal_steps_whole(flare_models, monkeypatch):
    """redraft=tree rounds (commits along the branch) and causal steps the pacer picks, beside a Diffusion-Trust
    lane whose rows make steps recorded rows forwards: a causal step right after a round that took the branch
    says nothing of branch commits (it commits its one row); greedy AR-Trust gives the causal tokens."""
    from flare.decoding.ar_trust import ArTrustLane
    from flare.decoding.pacer import CAUSAL, EVERY, Pacer

    flip = iter([EVERY, EVERY, EVERY, CAUSAL] * 100)  # (a round after causal steps is cold: no branch there)
    monkeypatch.setattr(Pacer, "next", lambda self, sequences, covered=None: next(flip))
    seen = []  # per consume: whether every sequence of the lane stepped causally

    def consume(self, live, logits, inner=ArTrustLane.consume):
        seen.append(len(self.paused) == len(live))
        return inner(self, live, logits)

    monkeypatch.setattr(ArTrustLane, "consume", consume)
    ends, taken = ArTrustLane.commit_ends, []
    monkeypatch.setattr(ArTrustLane, "commit_ends", lambda self: taken.append((seen[-1], ends(self))) or ends(self))
    model, rng = flare_models["llama"], random.Random(3)
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    requests = [(_prompt(rng, 5), params, mode, options) for mode, options in
                [("ar_trust", {"redraft": "tree"}), ("diffusion_trust", {}), ("ar_trust", {"redraft": "tree"})]]
    busy = _run(Engine(model, EngineConfig(max_num_seqs=4)), requests)
    hit = [e is not None and bool((e >= 0).any()) for _, e in taken]
    assert any(hit[i] and taken[i + 1][0] for i in range(len(hit) - 1))  # a causal step right after a branch
    assert all(e is None for causal, e in taken if causal)
    for prompt, params, mode, options in requests:
        want = decode(model, [prompt], params, None if mode == "ar_trust" else make_options(mode, options))
        assert busy.pop(0)[1] == want.token_ids[0], mode  # greedy AR-Trust: the causal tokens
