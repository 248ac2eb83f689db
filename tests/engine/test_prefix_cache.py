"""Kept prompt beginnings (flare.engine.prefix_cache): a prompt started from one decodes as from a whole prefill."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import flare.ops.gated_delta.pending as pending
from flare.decoding import SamplingParams, make_options
from flare.engine import Engine, EngineConfig
from flare.engine.prefix_cache import MIN_TOKENS, PrefixCache, _common
from flare.engine.reference import ReferenceRunner
from flare.engine.runner import CachedRunner


def test_common_prefix_length_matches_a_plain_count():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(3) for _ in range(rng.randrange(0, 40))]
        b = a[:rng.randrange(0, len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 10))]
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        assert _common(tuple(a), b) == n


def _prompts(rng: random.Random) -> list[list[int]]:
    """A shared 24-token beginning (a system prompt) with tails, a prompt repeated, one extending another
    (a conversation's next turn), and one sharing nothing."""
    system = [rng.randrange(90) for _ in range(24)]
    tails = [[rng.randrange(90) for _ in range(rng.randrange(3, 9))] for _ in range(4)]
    first = system + tails[0]
    return [first, *[system + t for t in tails[1:]], first, first + [rng.randrange(90) for _ in range(5)],
            [rng.randrange(90) for _ in range(30)]]


def _run(model, prompts, mode, options, mb, seeded=False):
    engine = Engine(model, EngineConfig(max_num_seqs=2, prefix_cache_mb=mb))
    seqs = []
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=0.8, seed=i, max_new_tokens=12) if seeded else \
            SamplingParams(temperature=0, max_new_tokens=12)
        seqs.append(engine.add_request(p, params, make_options(mode, options)))
    while engine.has_work:
        engine.step()
    return [s.output_ids for s in seqs], engine.stats


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
@pytest.mark.parametrize("mode,options,seeded", [
    ("causal", {}, False), ("ar_trust", {}, False), ("ar_trust", {"redraft": "every"}, False),
    ("ar_trust", {}, True), ("diffusion_trust", {}, False)])
def test_prompts_started_from_kept_beginnings_decode_as_from_a_whole_prefill(flare_models, family, mode, options,
                                                                             seeded):
    model = copy.deepcopy(flare_models[family]).to(torch.float64)  # exact to round-off: greedy ties cannot flip
    prompts = _prompts(random.Random(3))
    fresh, _ = _run(model, prompts, mode, options, mb=0, seeded=seeded)
    kept, stats = _run(model, prompts, mode, options, mb=64, seeded=seeded)
    assert kept == fresh
    # Reuse happened (two prompts are admitted at a time): with attention layers only, the four prompts after the
    # first pair start from kept beginnings; with recurrent layers the second pair stops at their shared system
    # prompt to keep it, and the repeated prompt (from there) and the next turn (from the whole first) start
    # from kept states.
    hybrid = model.config.has_linear_attention
    assert stats.prefix_hits >= (2 if hybrid else 4) and stats.prefix_tokens >= 2 * MIN_TOKENS


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_a_restored_beginning_continues_as_the_reference(flare_models, family, monkeypatch):
    """A prompt kept after its prefill (with kept commits, the rows prefill's, on the recurrent layers), copied
    into another slot and continued: the logits of the continuation equal the cache-free reference's over the whole
    prompt, and decode steps after it too."""
    monkeypatch.setattr(pending, "KEEP_MIN_STATE_BYTES", 0)
    model = copy.deepcopy(flare_models[family]).to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    first = torch.randint(0, 90, (20,), generator=gen).tolist()
    tail = torch.randint(0, 90, (7,), generator=gen).tolist()
    cached, ref = CachedRunner(model, 2, 16), ReferenceRunner(model, 2)
    with torch.inference_mode():
        cached.prefill([first, []])
        tokens = torch.cat([torch.tensor([first[-4:]]), torch.full((1, 2), 95)], 1)
        cached.rows(torch.cat([tokens, tokens]), torch.tensor([4, 0]), torch.tensor([2, 0]), record=True)
        cached.commit_recorded(torch.tensor([3, 0]))  # a kept commit on slot 0: its state is written on keep
        kept = first + first[-4:-1]
        prefix = PrefixCache(1 << 24, model.config.has_linear_attention)
        prefix.keep(cached.cache, 0, kept)
        prompt = kept + tail
        # Attention layers only: any beginning of a kept prompt serves; else the whole of it.
        entry, n, shared = prefix.match(prompt, len(prompt) - 1)
        assert shared == len(kept) and n == len(kept)
        if not model.config.has_linear_attention:
            assert prefix.match(kept[:18] + tail, 24)[1] == 18
        else:
            assert prefix.match(kept[:18] + tail, 24)[0] is None
        cached.reset([1])
        prefix.restore(cached.cache, 1, entry, n)
        cached.known[1] = n
        got = cached.prefill([[], prompt[n:]])[1]
        want = ref.prefill([[], prompt])[1]
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        step = torch.tensor([[5], [6]])
        torch.testing.assert_close(cached.append(step)[1], ref.append(step)[1], rtol=1e-9, atol=1e-9)


def test_recurrent_models_keep_a_shared_beginning_once_and_start_from_it(flare_models):
    model = flare_models["qwen3_5"]
    rng = random.Random(5)
    system = [rng.randrange(90) for _ in range(20)]
    engine = Engine(model, EngineConfig(max_num_seqs=1, prefix_cache_mb=16))
    prefix = engine.stepper.prefix
    for i in range(3):
        seq = engine.add_request(system + [rng.randrange(90) for _ in range(4)],
                                 SamplingParams(temperature=0, max_new_tokens=2), "causal")
        while engine.has_work:
            engine.step()
        assert seq.output_ids
        if i == 1:  # the second prompt stopped at the shared 20 tokens and kept them
            assert tuple(system) in prefix.entries and prefix.hits == 0
    assert prefix.hits == 1 and prefix.reused == 20  # the third started there
    engine.reset_prefix_cache()
    assert not prefix.entries and prefix.bytes == 0


def test_the_budget_keeps_the_most_recently_used_beginnings(flare_models):
    model = flare_models["llama"]
    runner = CachedRunner(model, 1, 64)
    prompts = [[i] * 20 for i in range(4)]
    with torch.inference_mode():
        runner.prefill([prompts[0]])
    size = sum(t.numel() * t.element_size() for layer in runner.cache.layers for t in (layer.k, layer.v)) // 64 * 20
    prefix = PrefixCache(2 * size, recurrent=False)
    for p in prompts[:2]:
        prefix.keep(runner.cache, 0, p)  # (the tokens name the entry; the state copied is whatever slot 0 holds)
    prefix.match(prompts[0] + [1], 20)  # a match alone does not count as use; a restore does
    prefix.restore(runner.cache, 0, prefix.entries[tuple(prompts[0])], 20)
    prefix.keep(runner.cache, 0, prompts[2])
    assert list(prefix.entries) == [tuple(prompts[0]), tuple(prompts[2])] and prefix.bytes == 2 * size
    prefix.keep(runner.cache, 0, [7] * (MIN_TOKENS - 1))  # too short to keep
    assert len(prefix.entries) == 2
    small = PrefixCache(size - 1, recurrent=False)
    small.keep(runner.cache, 0, prompts[3])  # larger than the whole budget
    assert not small.entries
    with pytest.raises(ValueError, match="budget"):
        PrefixCache(-1, recurrent=False)
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        EngineConfig(prefix_cache_mb=-1)
    assert Engine(model, EngineConfig(prefix_cache_mb=0)).stepper.prefix is None


def test_the_entry_count_is_bounded_and_lookups_read_only_entries_with_the_same_start(flare_models, monkeypatch):
    import flare.engine.prefix_cache as prefix_cache

    monkeypatch.setattr(prefix_cache, "MAX_ENTRIES", 2)
    runner = CachedRunner(flare_models["llama"], 1, 64)
    prefix = PrefixCache(1 << 24, recurrent=False)
    shared = list(range(MIN_TOKENS))
    for tail in ([1, 2], [3, 4], [5, 6]):
        prefix.keep(runner.cache, 0, shared + tail)
    assert list(prefix.entries) == [tuple(shared + [3, 4]), tuple(shared + [5, 6])]
    assert {k: list(v) for k, v in prefix.by_start.items()} == {tuple(shared): list(prefix.entries)}
    assert prefix.match(shared + [5, 7, 8], 18)[1:] == (MIN_TOKENS + 1, MIN_TOKENS + 1)
    assert prefix.match([99] + shared + [5, 6], 18) == (None, 0, 0)  # another start: not read at all
    monkeypatch.setattr(prefix_cache, "LOOKUP", 1)  # only the most recently used entry with that start is read
    assert prefix.match(shared + [3, 4, 8], 18)[1:] == (MIN_TOKENS, MIN_TOKENS)  # from [.., 5, 6]
    prefix.restore(runner.cache, 0, prefix.entries[tuple(shared + [3, 4])], MIN_TOKENS + 2)
    assert prefix.match(shared + [3, 4, 8], 18)[1:] == (MIN_TOKENS + 2, MIN_TOKENS + 2)
    prefix.reset()
    assert not prefix.entries and not prefix.by_start


def test_evaluation_times_each_mode_from_an_empty_prefix_cache(tiny_dirs):
    """``flare.eval.evaluate`` forgets the kept beginnings before each mode's timed run: otherwise a mode would
    find its prompts kept by the warm-up (or by the mode before it) and skip their prefills."""
    from flare.decoding import parse_modes
    from flare.engine.llm import LLM
    from flare.eval import EvalItem, Task, evaluate

    llm = LLM.from_dir(tiny_dirs["llama"], config=EngineConfig(max_num_seqs=2))
    items = [EvalItem(f"Please add the two numbers below and answer: {a} and {a + 1}", str(2 * a + 1),
                      lambda response: 0.0) for a in range(4)]
    seen, generate = [], llm.generate  # entries kept at the start and the end of each generate call

    def counting(prompts, *args, **kwargs):
        before = len(llm.engine.stepper.prefix.entries)
        out = generate(prompts, *args, **kwargs)
        seen.append((before, len(llm.engine.stepper.prefix.entries)))
        return out

    llm.generate = counting
    evaluate(llm, Task("sums", items), parse_modes("causal"),
             SamplingParams(temperature=0, max_new_tokens=3), progress=False)
    assert seen[0][1] > 0  # the warm-up kept its prompts ...
    assert seen[-1][0] == 0 and len(seen) >= 2  # ... and the timed run started from none
    assert llm.engine.stats.prefix_hits > 0  # whose later prompts started from its earlier ones


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
@pytest.mark.parametrize("mode,options", [
    ("causal", {}), ("ar_trust", {}), ("ar_trust", {"redraft": "every"}), ("diffusion_trust", {}),
    ("diffusion_trust", {"lookahead": 1}), ("low_confidence", {}), ("llada", {"block_size": 8, "steps": 4})])
def test_a_conversations_next_turn_starts_where_the_last_one_ended(flare_models, family, mode, options):
    """A finished request's prompt and output (what its slot committed) are kept at its release: the next turn,
    which repeats them, starts from there in every mode, and decodes as from a whole prefill."""
    model = copy.deepcopy(flare_models[family]).to(torch.float64)
    rng = random.Random(7)
    first, extra = [rng.randrange(90) for _ in range(20)], [rng.randrange(90) for _ in range(3)]
    outputs = {}
    for mb in (0, 64):
        engine = Engine(model, EngineConfig(max_num_seqs=2, prefix_cache_mb=mb))
        params = SamplingParams(temperature=0, max_new_tokens=10)
        seq = engine.add_request(first, params, make_options(mode, options))
        while engine.has_work:
            engine.step()
        turn = first + seq.output_ids + extra
        if mb:
            before = engine.stats.prefix_tokens
        nxt = engine.add_request(turn, params, make_options(mode, options))
        while engine.has_work:
            engine.step()
        outputs[mb] = (seq.output_ids, nxt.output_ids)
        if mb:  # at least the prompt and all but the last output token of the first turn; a block decoder commits
            # whole blocks, past the output's end here: with recurrent layers its state serves from the prompt only
            whole = mode in ("causal", "ar_trust") or not model.config.has_linear_attention
            assert engine.stats.prefix_tokens - before >= len(first) + (len(seq.output_ids) - 1 if whole else 0)
    assert outputs[0] == outputs[64]


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
@pytest.mark.parametrize("mode,options", [("causal", {}), ("ar_trust", {}), ("diffusion_trust", {})])
def test_kept_beginnings_with_admissions_apart(flare_models, family, mode, options, monkeypatch):
    """Restored beginnings continued by prefills that run their slots apart (``CachedRunner.apart``, forced for
    every admission beside a running sequence): the tokens of whole prefills over every slot."""
    import flare.engine.runner as runner

    model = copy.deepcopy(flare_models[family]).to(torch.float64)
    prompts = _prompts(random.Random(4))
    monkeypatch.setattr(runner, "COMPACT_ROWS", 1 << 30)
    fresh, _ = _run(model, prompts, mode, options, mb=0)
    monkeypatch.setattr(runner, "COMPACT_ROWS", 1)
    kept, stats = _run(model, prompts, mode, options, mb=64)
    assert kept == fresh and stats.prefix_hits >= 2


def test_prompts_admitted_together_share_a_beginning_through_one_leader():
    """``shared_in``: the first prompt with a beginning shared by later ones leads (stops there, at what it shares
    with its first follower); followers gain at least MIN_TOKENS over what they start from anyway; with recurrent
    layers a later follower must start with the whole of its leader's beginning, with attention only any part."""
    rng = random.Random(11)
    system = [rng.randrange(90) for _ in range(30)]
    tail = lambda n: [rng.randrange(90) for _ in range(n)]  # noqa: E731
    a, b = system + tail(6), system + tail(5)
    c = system[:20] + tail(10)  # shares 20 with the leader, less than its 30
    d = tail(40)  # shares nothing
    e = system[:10] + tail(10)  # shares 10: too little to follow
    for recurrent in (False, True):
        prefix = PrefixCache(1 << 20, recurrent)
        cuts, leads = prefix.shared_in([a, b, c, d, e], [0] * 5)
        assert cuts == {0: 30}
        assert leads == ({1: 0} if recurrent else {1: 0, 2: 0})
    # A follower already covered past what it would gain (e.g. from a kept beginning) does not follow, and a
    # leader covered up to the shared beginning leads nothing: the shared part is in its cache already.
    prefix = PrefixCache(1 << 20, False)
    assert prefix.shared_in([a, b], [0, 20]) == ({}, {})
    assert prefix.shared_in([a, b], [30, 0]) == ({}, {})
    assert prefix.shared_in([a, b, system + tail(3)], [0, 0, 0]) == ({0: 30}, {1: 0, 2: 0})
    # A prompt keeps one token to prefill (its logits), and nothing under MIN_TOKENS is kept.
    assert prefix.shared_in([system[:17], system[:17]], [0, 0]) == ({0: 16}, {1: 0})
    assert prefix.shared_in([system[:16], system[:16]], [0, 0]) == ({}, {})


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
@pytest.mark.parametrize("mode,options", [("causal", {}), ("ar_trust", {}), ("ar_trust", {"redraft": "every"}),
                                          ("diffusion_trust", {})])
def test_a_burst_with_one_system_prompt_prefills_it_once(flare_models, family, mode, options, monkeypatch):
    """Four prompts with one 24-token system prompt admitted in one call: the first prefills it alone and keeps
    it, the other three start from it, and every token is as from whole prefills."""
    model = copy.deepcopy(flare_models[family]).to(torch.float64)
    rng = random.Random(12)
    system = [rng.randrange(90) for _ in range(24)]
    prompts = [system + [rng.randrange(90) for _ in range(rng.randrange(3, 9))] for _ in range(4)]
    prefilled = []
    prefill = CachedRunner.prefill
    monkeypatch.setattr(CachedRunner, "prefill", lambda self, tokens: prefilled.append(sum(map(len, tokens)))
                        or prefill(self, tokens))
    outputs = {}
    for mb in (0, 64):
        engine = Engine(model, EngineConfig(max_num_seqs=4, prefix_cache_mb=mb))
        params = SamplingParams(temperature=0, max_new_tokens=10)
        seqs = [engine.add_request(p, params, make_options(mode, options)) for p in prompts]
        prefilled.clear()
        engine.step()  # the admission of all four
        first = list(prefilled)
        while engine.has_work:
            engine.step()
        outputs[mb] = [s.output_ids for s in seqs]
        if mb:
            assert engine.stats.prefix_hits == 3 and engine.stats.prefix_tokens == 3 * 24
            assert first[0] == 24  # the leader's beginning, alone, first
    assert outputs[0] == outputs[64]


@pytest.mark.parametrize("graphs,device", [
    ("emulate", "cpu"),
    pytest.param("1", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("mode", ["causal", "ar_trust"])
def test_kept_beginnings_under_graphed_decoding_cuda(flare_models, graphs, device, mode, monkeypatch):
    """Restored beginnings under decoding replayed from graphs (``FLARE_CUDA_GRAPHS``; emulated on the CPU,
    real on CUDA, where ``benchmarks/gpu_check.sh`` runs this): the tokens of eager decoding without them."""
    model = copy.deepcopy(flare_models["qwen3_5"]).to(device=device, dtype=torch.float64)
    prompts = _prompts(random.Random(5))
    want, _ = _run(model, prompts, mode, {}, mb=0)
    monkeypatch.setenv("FLARE_CUDA_GRAPHS", graphs)
    got, stats = _run(model, prompts, mode, {}, mb=64)
    assert got == want and stats.prefix_hits >= 2
    assert model.compiled_with.startswith("FLARE_CUDA_GRAPHS")  # the steps did run from graphs


def test_a_failed_admission_keeps_nothing(flare_models, monkeypatch):
    """A prefill that raises (out of memory, say) leaves its slot half-written; the serving loops then abort what
    is in flight, and that release keeps nothing under anyone's tokens."""
    model = copy.deepcopy(flare_models["llama"]).to(torch.float64)
    engine = Engine(model, EngineConfig(max_num_seqs=1, prefix_cache_mb=16))
    rng = random.Random(8)
    params = SamplingParams(temperature=0, max_new_tokens=3)
    for _ in range(2):  # (longer than the one that fails: cut to its length, theirs would be a new key)
        engine.add_request([rng.randrange(90) for _ in range(40)], params, "causal")
        while engine.has_work:
            engine.step()
    kept = dict(engine.stepper.prefix.entries)
    runner = engine.stepper.runner
    prefill = runner.prefill

    def failing(tokens):
        prefill(tokens)  # (the slot's state is written, then the forward after it fails)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runner, "prefill", failing)
    seq = engine.add_request([rng.randrange(90) for _ in range(30)], params, "causal")
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.step()
    assert engine.abort(seq.request_id)
    assert engine.stepper.prefix.entries == kept
