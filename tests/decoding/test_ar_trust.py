"""AR-Trust: greedy == causal token for token, exact sampling law, exact commits on partial acceptance."""

from __future__ import annotations

import copy

import pytest
import torch

import flare
from flare.decoding import ArTrustOptions, SamplingParams
from flare.engine import decode
from flare.model.context import Rows
from flare.model import CommitRecord
from flare.testing.checkpoints import FAMILIES, save_tiny_checkpoint


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 90, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gen_block", [2, 4, 6])
@pytest.mark.parametrize("redraft", ["last", "every", "tree"])
def test_greedy_ar_trust_equals_greedy_causal(flare_models, family, gen_block, redraft):
    model = flare_models[family]
    prompts = _prompts([1, 4, 13, 30], seed=gen_block)
    params = SamplingParams(temperature=0, max_new_tokens=18)
    causal = decode(model, prompts, params)
    trust = decode(model, prompts, params, ArTrustOptions(gen_block=gen_block, redraft=redraft))
    assert trust.token_ids == causal.token_ids
    assert trust.drafted > 0 and trust.mode == "ar_trust"


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
@pytest.mark.parametrize("redraft", ["last", "every", "tree"])
@pytest.mark.parametrize("pause", [0, 4])
def test_a_draft_vocabulary_leaves_greedy_tokens_causal(flare_models, monkeypatch, family, redraft, pause):
    """The MASK rows draft among the first ids only (a proposal the verify rows judge over the whole vocabulary):
    the tokens stay the causal ones, every draft is in the shortlist, and the whole-vocabulary head never drafts."""
    from flare.decoding.lane import RowLogits

    model = flare_models[family]
    prompts = _prompts([1, 4, 13, 30], seed=5)
    params = SamplingParams(temperature=0, max_new_tokens=18)
    drafts = []
    inner = RowLogits.draft_picks_at
    monkeypatch.setattr(RowLogits, "draft_picks_at", lambda self, at, k: drafts.append(inner(self, at, k)) or
                        drafts[-1])
    laws = RowLogits.draft_at  # (tree: the drafts and the branch's second choice from the same logits)
    monkeypatch.setattr(RowLogits, "draft_at", lambda self, at, k: drafts.append(laws(self, at, k).argmax(-1)) or
                        laws(self, at, k))
    monkeypatch.setattr(RowLogits, "at", lambda *a: pytest.fail("drafted over the whole vocabulary"))
    monkeypatch.setattr(RowLogits, "picks_at", lambda *a: pytest.fail("drafted over the whole vocabulary"))
    causal = decode(model, prompts, params)
    trust = decode(model, prompts, params, ArTrustOptions(gen_block=4, redraft=redraft, pause=pause, draft_vocab=40))
    assert trust.token_ids == causal.token_ids and trust.drafted > 0
    picked = torch.cat([d.flatten() for d in drafts])
    eos = model.config.eos_token_ids
    assert ((picked < 40) | torch.isin(picked, torch.tensor(eos))).all()
    assert (picked != model.config.mask_token_id).all()


def test_draft_vocabulary_ids_and_logits(flare_models):
    """The shortlist is ids below k with the end tokens and without [MASK]; its logits are the full head's at
    those ids (packed or not), and spread over the vocabulary they are -inf elsewhere."""
    from flare.model.draft_vocab import draft_ids, draft_law_logits, draft_logits
    from flare.model.layers import frozen_weights

    model = flare_models["qwen3_5"]
    cfg, V = model.config, model.lm_head.weight.shape[0]
    ids = draft_ids(cfg, V, 10)
    assert ids.tolist() == sorted(set(range(10)) | set(cfg.eos_token_ids) - {cfg.mask_token_id})
    hidden = torch.randn(2, 3, cfg.hidden_size)
    with torch.inference_mode():
        full = model.logits(hidden.clone())
        for frozen in (False, True):
            if frozen:
                with frozen_weights():
                    short, got = draft_logits(model, hidden, 10)
            else:
                short, got = draft_logits(model, hidden, 10)
            assert got.tolist() == ids.tolist()
            torch.testing.assert_close(short, full[..., ids])
        spread = draft_law_logits(model, hidden, 10)
        torch.testing.assert_close(spread[..., ids], full[..., ids])
        assert spread.isinf().sum() == 2 * 3 * (V - len(ids))


def test_redrafting_from_every_acceptance_point_leaves_no_cold_round(flare_models):
    """A random model rejects almost every draft: with redraft=last every round after a rejection is cold (no
    drafts to verify); with every, each round verifies N-1 drafts (the prefill drafted the first)."""
    model, N = flare_models["llama"], 4
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    for redraft in ("last", "every"):
        out = decode(model, [[3, 1, 4]], params, ArTrustOptions(gen_block=N, redraft=redraft, pause=0))
        rounds = out.forwards - 1  # after the prefill
        if redraft == "every":
            assert out.drafted == (N - 1) * rounds
        else:
            assert 0 < out.drafted < (N - 1) * rounds


@pytest.mark.parametrize("family", FAMILIES)
def test_the_branch_commits_two_tokens_where_it_is_the_correction(flare_models, monkeypatch, family):
    """redraft=tree: rounds whose first draft fails for the branch's token commit it and the branch row's token
    (2 tokens, along the branch); greedy tokens stay causal, cached and in the cache-free reference; sampled ones
    take it too (``test_sampled_rounds_take_the_branch_too``)."""
    from flare.decoding.ar_trust import ArTrustLane

    model = flare_models[family]
    prompts = _prompts([2, 5, 11, 3, 8], seed=3)
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    hits = []
    ends = ArTrustLane.commit_ends
    monkeypatch.setattr(ArTrustLane, "commit_ends", lambda self: hits.append(ends(self)) or hits[-1])
    options = ArTrustOptions(gen_block=4, redraft="tree", pause=0)
    causal = decode(model, prompts, params).token_ids
    tree = decode(model, prompts, params, options)
    taken = sum(int((h >= 0).sum()) for h in hits if h is not None)
    assert tree.token_ids == causal and taken > 0
    assert decode(model, prompts, params, options, reference=True).token_ids == causal


def test_sampled_rounds_take_the_branch_too(tiny_vocab_model, monkeypatch):
    """Sampled with argmax drafts (8 token ids, so the branch is often the correction): rounds commit along the
    branch, drawing the branch row's token from its law; the cache-free reference draws the same (the law itself:
    ``test_sampling_law_is_the_causal_law``). Drafts drawn from their laws (exact_truncated) take no branch: their
    rounds are every's, draw for draw."""
    from flare.decoding.ar_trust import ArTrustLane

    hits = []
    ends = ArTrustLane.commit_ends
    monkeypatch.setattr(ArTrustLane, "commit_ends", lambda self: hits.append(ends(self)) or hits[-1])
    prompts = [[t % 7 for t in p] for p in _prompts([2, 5, 3], seed=4)]
    options = ArTrustOptions(gen_block=4, redraft="tree", pause=0, draft_policy="argmax_full_verify")
    sampled = SamplingParams(temperature=1.0, top_k=5, max_new_tokens=24, ignore_eos=True, seed=3)
    out = decode(tiny_vocab_model, prompts, sampled, options)
    assert sum(int((h >= 0).sum()) for h in hits if h is not None) > 0
    assert out.token_ids == decode(tiny_vocab_model, prompts, sampled, options, reference=True).token_ids
    hits.clear()
    drawn = [ArTrustOptions(gen_block=4, redraft=r, pause=0) for r in ("tree", "every")]
    assert len({tuple(map(tuple, decode(tiny_vocab_model, prompts, sampled, o).token_ids)) for o in drawn}) == 1
    assert all(h is None for h in hits)


@pytest.mark.parametrize("policy", ["exact_truncated", "argmax_full_verify", "argmax_truncated"])
@pytest.mark.parametrize("redraft", ["last", "every", "tree"])
def test_every_policy_is_greedy_at_temperature_zero_and_matches_its_reference(flare_models, policy, redraft):
    model = flare_models["qwen3_5"]
    prompts = _prompts([3, 9])
    params = SamplingParams(temperature=0, max_new_tokens=12)
    options = ArTrustOptions(draft_policy=policy, redraft=redraft)
    out = decode(model, prompts, params, options)
    assert out.token_ids == decode(model, prompts, params).token_ids
    sampled = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=12, seed=3)
    cached = decode(model, prompts, sampled, options)
    assert cached.token_ids == decode(model, prompts, sampled, options, reference=True).token_ids


@pytest.mark.parametrize("redraft", ["last", "every", "tree"])
def test_commits_kept_as_updates_decode_the_same(flare_models, redraft, monkeypatch):
    """With every commit kept as an update of the recurrent states (the tiny model's states are below the size
    that keeps them by default): greedy AR-Trust == greedy causal, sampled == the cache-free reference."""
    import flare.ops.gated_delta.pending as pending

    monkeypatch.setattr(pending, "KEEP_MIN_STATE_BYTES", 0)
    model = flare_models["qwen3_5"]
    prompts = _prompts([3, 9, 5])
    options = ArTrustOptions(redraft=redraft, pause=0)
    greedy = SamplingParams(temperature=0, max_new_tokens=20)
    assert decode(model, prompts, greedy, options).token_ids == decode(model, prompts, greedy).token_ids
    sampled = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=20, seed=3)
    assert (decode(model, prompts, sampled, options).token_ids
            == decode(model, prompts, sampled, options, reference=True).token_ids)


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_commit_of_any_prefix_equals_causal_prefill(flare_models, family, dtype):
    """After a recorded rows forward, committing n of its clean rows == a causal prefill of those tokens."""
    model = copy.deepcopy(flare_models[family]).to(dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    prefix = torch.randint(0, 90, (3, 7))
    clean = torch.randint(0, 90, (3, 4))
    rows = torch.cat([clean, torch.full((3, 3), 95)], 1)
    n_accept = torch.tensor([1, 4, 2])
    with torch.no_grad():
        cache = model.new_cache(3)
        model.hidden_states(prefix, cache=cache)
        record = CommitRecord.empty()
        model.hidden_states(rows, cache=cache, layout=Rows(4), record=record)
        cache.commit(record, n_accept)
        for b in range(3):
            ref = model.new_cache(1)
            model.hidden_states(torch.cat([prefix[b : b + 1], clean[b : b + 1, : n_accept[b]]], 1), cache=ref)
            n = 7 + int(n_accept[b])
            assert int(cache.lengths[b]) == n
            _assert_row_caches_equal(cache, b, ref, n, tol)
        # And decoding continues from the committed state exactly as from the prefill: the next token's hidden
        # state equals the last one of a causal pass over the whole sequence, and so do the caches it leaves.
        nxt = torch.randint(0, 90, (3, 1))
        after = model.hidden_states(nxt, cache=cache)
        assert after.shape == (3, 1, model.config.hidden_size)
        for b in range(3):
            ref = model.new_cache(1)
            whole = model.hidden_states(
                torch.cat([prefix[b : b + 1], clean[b : b + 1, : n_accept[b]], nxt[b : b + 1]], 1), cache=ref)
            n = 7 + int(n_accept[b]) + 1
            assert whole.shape[1] == n and int(cache.lengths[b]) == n
            assert (after[b, 0] - whole[0, -1]).abs().max() <= tol
            _assert_row_caches_equal(cache, b, ref, n, tol)


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_commit_along_the_branch_equals_causal_prefill(flare_models, family):
    """A tree round (``flare.decoding.groups``) whose sequence commits ``pending`` and the branch row (``ends``):
    its caches == a causal prefill of [pending, second], beside sequences committing a prefix of the chain in
    the same commit; the next step continues exactly."""
    from flare.decoding.groups import Groups

    model, N, tol = copy.deepcopy(flare_models[family]).to(torch.float64), 4, 1e-10
    g = torch.Generator().manual_seed(11)
    prefix = torch.randint(0, 90, (3, 7), generator=g)
    clean, second = torch.randint(0, 90, (3, N), generator=g), torch.randint(0, 90, (3,), generator=g)
    groups = Groups(N, 95, 3, torch.device("cpu"), branch=True)
    rows = groups.tokens(clean[:, 0], clean[:, 1:], second)
    n_accept, ends = torch.tensor([2, 3, 2]), torch.tensor([N, -1, -1])  # sequence 0 takes the branch
    with torch.no_grad():
        cache = model.new_cache(3)
        model.hidden_states(prefix, cache=cache)
        record = CommitRecord.empty()
        model.hidden_states(rows, cache=cache, layout=Rows(N, groups.rows - N, seeds=groups.seeds), record=record)
        cache.commit(record, n_accept, ends)
        nxt = torch.randint(0, 90, (3, 1), generator=g)
        after = model.hidden_states(nxt, cache=cache)
        for b in range(3):
            ref = model.new_cache(1)
            committed = clean[b, :n_accept[b]] if b else torch.stack([clean[0, 0], second[0]])
            whole = model.hidden_states(torch.cat([prefix[b], committed, nxt[b]])[None], cache=ref)
            n = 7 + int(n_accept[b]) + 1
            assert int(cache.lengths[b]) == n
            assert (after[b, 0] - whole[0, -1]).abs().max() <= tol
            _assert_row_caches_equal(cache, b, ref, n, tol)


def _assert_row_caches_equal(cache, b: int, ref, n: int, tol: float) -> None:
    """Row b of ``cache`` holds what the one-row ``ref`` holds: the first n KV slots, conv and recurrent states."""
    for mine, theirs in zip(cache.layers, ref.layers):
        if hasattr(mine, "k"):
            assert (mine.k[b, :, :n] - theirs.k[0, :, :n]).abs().max() <= tol
            assert (mine.v[b, :, :n] - theirs.v[0, :, :n]).abs().max() <= tol
        else:
            assert (mine.conv[b] - theirs.conv[0]).abs().max() <= tol
            # (a commit is kept as an update of the stored state until a causal forward writes it)
            assert (mine.pending.state(mine.ssm)[b] - theirs.ssm[0]).abs().max() <= tol


@pytest.fixture(scope="module")
def tiny_vocab_model(tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("v8"), "qwen3_5", seed=4, tokenizer=False, vocab_size=8)
    model = flare.load_model(path)
    model.config.mask_token_id = 7
    return model


@pytest.mark.parametrize("policy, redraft, draft_vocab, top_p", [
    ("exact_truncated", "last", 0, 1.0), ("argmax_full_verify", "last", 0, 1.0), ("exact_truncated", "every", 0, 1.0),
    ("argmax_full_verify", "tree", 0, 1.0), ("exact_truncated", "last", 4, 1.0),
    ("exact_truncated", "last", 0, 0.8)])
def test_sampling_law_is_the_causal_law(tiny_vocab_model, policy, redraft, draft_vocab, top_p):
    """Chi-square of the first three sampled tokens against the exact causal law, at a fixed seed; with a draft
    vocabulary of ids 0-3 the drafts never propose 4-6, which the causal law still draws. The law is filtered
    through one sort of the vocabulary; decoding filters without one (top-k, or with top_p a nucleus found by a
    radix select: ``flare.ops.sampling``)."""
    model = tiny_vocab_model
    prompt, n = [1, 5, 2], 12_000
    params = SamplingParams(temperature=1.0, top_k=5 if top_p == 1.0 else 0, top_p=top_p, max_new_tokens=3,
                            ignore_eos=True, seed=11)
    out = decode(model, [prompt] * n, params, ArTrustOptions(gen_block=4, draft_policy=policy, redraft=redraft,
                                                             draft_vocab=draft_vocab))
    assert out.accepted > 0.05 * out.drafted  # drafts pass often enough that acceptance is really exercised
    _assert_causal_law(model, prompt, params, out.token_ids)


def _assert_causal_law(model, prompt, params, token_ids) -> None:
    """Chi-square of the first three tokens of ``token_ids`` against the exact causal law."""
    n = len(token_ids)
    counts = torch.zeros(8, 8, 8)
    for t in token_ids:
        counts[t[0], t[1], t[2]] += 1
    expected = _causal_law(model, prompt, params) * n
    cells = expected > 5
    chi2 = ((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum().item()
    dof = int(cells.sum()) - 1
    # Far above dof + 4 sqrt(2 dof) is a failure; a 2% bias on a likely cell pushes chi2 well past it.
    assert chi2 < dof + 4 * (2 * dof) ** 0.5, (chi2, dof)
    assert counts[~cells].sum() <= 0.02 * n


@pytest.mark.parametrize("redraft, first, turns", [
    ("last", 3, (3, 1, 2)), ("last", 3, (1, 3, 0)), ("auto", 3, (2, -1, 1)), ("last", 0, (2, 3))])
def test_paced_sampling_law_is_the_causal_law(tiny_vocab_model, monkeypatch, redraft, first, turns):
    """Unseeded sampled sequences are paced: whatever the pacer picks per round (``turns`` in a cycle: m drafts, a
    group per acceptance point -1, causal steps 0; ``first`` 0: the prompts are prefilled whole, as for causal
    steps), a round verifies the prefix of the drafts it holds that it has rows for (3 of 3 then 1, 1 of 1 with 3
    MASK rows, 2 under a group per acceptance point), and the tokens still follow the causal law (chi-square as
    above; so many prompts take the plain prefill, so a first round is cold)."""
    import itertools

    from flare.decoding.pacer import Pacer

    model = tiny_vocab_model
    model.pacing.clear()
    cycle = itertools.cycle(turns)
    ran = []
    monkeypatch.setattr(Pacer, "current", lambda self, covered: first)
    monkeypatch.setattr(Pacer, "next", lambda self, sequences, covered=None: ran.append(next(cycle)) or ran[-1])
    prompt, n = [1, 5, 2], 12_000
    params = SamplingParams(temperature=1.0, top_k=5, max_new_tokens=3, ignore_eos=True)
    torch.manual_seed(11)
    out = decode(model, [prompt] * n, params, ArTrustOptions(gen_block=4, redraft=redraft))
    model.pacing.clear()
    assert set(ran) == set(turns)
    assert out.accepted > 0.05 * out.drafted
    _assert_causal_law(model, prompt, params, out.token_ids)


def _causal_law(model, prompt, params):
    from flare.ops.sampling import filtered_probs

    def law(seq):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[:, -1]
        return filtered_probs(logits, *params.row_tensors(1, "cpu"))[0]

    p = torch.zeros(8, 8, 8)
    p1 = law(prompt)
    for a in range(8):
        if p1[a] == 0:
            continue
        p2 = law(prompt + [a])
        for b in range(8):
            if p2[b] > 0:
                p[a, b] = p1[a] * p2[b] * law(prompt + [a, b])
    return p


def test_bad_options(flare_models, tiny_models):
    model = flare_models["qwen3_5"]
    with pytest.raises(ValueError, match="gen_block"):
        decode(model, [[1]], SamplingParams(), ArTrustOptions(gen_block=1))
    with pytest.raises(ValueError, match="draft_policy"):
        decode(model, [[1]], SamplingParams(), ArTrustOptions(draft_policy="greedy"))
    with pytest.raises(ValueError, match="redraft"):
        ArTrustOptions(redraft="sometimes")
    with pytest.raises(ValueError, match="draft_vocab"):
        ArTrustOptions(draft_vocab=-1)
    with pytest.raises(ValueError, match="mask token"):
        decode(tiny_models["qwen3_5"][0], [[1]], SamplingParams(), "ar_trust")


@pytest.mark.parametrize("redraft, batch, heads_per_round", [("last", 2, 1), ("every", 2, 1), ("every", 5, 2)])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_lm_head_passes_per_round(flare_models, redraft, batch, heads_per_round, temperature):
    """The LM head is the largest matrix of a real model: with one MASK group a round reads it once (clean rows
    and drafts together); with a group per acceptance point once while the rows are few (2 x 16 here), else
    twice (5 x 16: the kept group is known after the verdict). Every pass runs with the weights frozen, so its
    derived values (a packed copy of the weight) are kept."""
    from flare.model.layers import weights_frozen

    model = flare_models["qwen3_5"]
    calls = []
    hook = model.lm_head.register_forward_pre_hook(lambda m, args: calls.append(weights_frozen()))
    try:
        params = SamplingParams(temperature=temperature, max_new_tokens=12, ignore_eos=True, seed=3)
        res = decode(model, _prompts([3, 9, 4, 6, 8][:batch]), params,
                     ArTrustOptions(gen_block=4, redraft=redraft, pause=0))
    finally:
        hook.remove()
    assert all(calls)
    assert len(calls) == heads_per_round * res.forwards  # the prefill plays the first round


@pytest.mark.parametrize("path, passes", [("amx", 1), ("avx512_bf16", 2), ("avx2", 2)])
def test_a_large_head_takes_two_passes_where_rows_cost(flare_models, monkeypatch, path, passes):
    """A group per acceptance point reads a large LM head in one pass only where rows are nearly free (AMX);
    elsewhere the clean rows, then the kept group."""
    import flare.decoding.ar_trust as ar_trust

    monkeypatch.setattr(ar_trust, "cpu_path", lambda: path)
    monkeypatch.setattr(ar_trust, "SMALL_HEAD", 1)
    model = flare_models["qwen3_5"]
    calls = []
    hook = model.lm_head.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
        res = decode(model, _prompts([3, 9]), params, ArTrustOptions(gen_block=4, redraft="every", pause=0))
    finally:
        hook.remove()
    assert len(calls) == passes * res.forwards


def _spoiled_drafts(monkeypatch, model) -> list[str]:
    """Drafts that are always rejected (replaced by [MASK], which is never predicted); returns the forwards run,
    "rows" (a drafting round or a drafting prefill) or "append" (a causal step or a plain prefill), in order."""
    from flare.decoding.ar_trust import ArTrustLane
    from flare.engine.runner import CachedRunner

    consume = ArTrustLane.consume

    def spoiled(self, live, logits):
        n = consume(self, live, logits)
        self.drafts = torch.full_like(self.drafts, model.config.mask_token_id)
        return n

    monkeypatch.setattr(ArTrustLane, "consume", spoiled)
    kinds = []
    for name in ("rows", "append"):
        inner = getattr(CachedRunner, name)
        monkeypatch.setattr(CachedRunner, name, lambda self, *a, _f=inner, _n=name, **k: kinds.append(_n) or _f(
            self, *a, **k))
    return kinds


@pytest.mark.parametrize("redraft", ["last", "every"])
def test_failed_drafting_pauses_into_causal_steps(flare_models, monkeypatch, redraft):
    """A sampled sequence (not paced) whose drafts always fail: after two verify rounds in a row with nothing
    accepted it takes `pause` plain causal steps (no rows forward), then drafts again, pausing twice as long when
    that fails too. top_k=1 makes its draws the greedy tokens, so they must be the causal ones."""
    model = flare_models["llama"]
    kinds = _spoiled_drafts(monkeypatch, model)
    params = SamplingParams(temperature=0.8, top_k=1, max_new_tokens=40, ignore_eos=True, seed=3)
    out = decode(model, [[3, 1, 4]], params, ArTrustOptions(gen_block=4, redraft=redraft, pause=2))
    greedy = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    assert out.token_ids == decode(model, [[3, 1, 4]], greedy).token_ids
    assert out.accepted == 0  # the premise: nothing is accepted on this model
    runs = [len(r) for r in "".join("c" if k == "append" else "r" for k in kinds).split("r") if r]
    # Rows forwards before the first pause: the prefill (which drafts) and two verify rounds; then pauses of
    # 2, 4, 8 causal steps, each followed by rows forwards again.
    assert runs[:3] == [2, 4, 8], kinds
    assert kinds.count("rows") < len(kinds) // 2


def test_a_greedy_batch_pauses_only_where_the_pacer_says(flare_models, monkeypatch):
    """All-greedy: the pacer picks causal steps, so failing drafts pause nothing by themselves (a pause inside a
    stint the pacer times as drafting would make drafting look cheaper than it is)."""
    model = flare_models["llama"]
    kinds = _spoiled_drafts(monkeypatch, model)
    # always drafting
    monkeypatch.setattr("flare.decoding.pacer.Pacer.next", lambda self, served, covered=None: self.kinds[0])
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    out = decode(model, [[3, 1, 4], [2, 7]], params, ArTrustOptions(gen_block=4, pause=2))
    ran = list(kinds)
    assert out.accepted == 0 and out.token_ids == decode(model, [[3, 1, 4], [2, 7]], params).token_ids
    assert set(ran) == {"rows"} and len(ran) == 20  # the drafting prefill, then 19 rounds of one token


@pytest.mark.parametrize("redraft", ["last", "every", "tree"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_prefill_plays_the_first_round(flare_models, monkeypatch, redraft, temperature):
    """A prompt's prefill also runs the MASK rows after it, so the first round already verifies: the same
    tokens (the same draws, with a seed) as a plain prefill followed by a cold round, one forward fewer."""
    model = flare_models["qwen3_5"]
    params = SamplingParams(temperature=temperature, max_new_tokens=12, ignore_eos=True, seed=5)
    opts = ArTrustOptions(gen_block=4, redraft=redraft, pause=0)
    drafting = decode(model, _prompts([3, 9]), params, opts)
    monkeypatch.setattr("flare.engine.stepper.DRAFTING_PREFILL_WORK", 0)  # every prompt "too long"
    plain = decode(model, _prompts([3, 9]), params, opts)
    assert drafting.token_ids == plain.token_ids
    assert drafting.drafted == plain.drafted and drafting.accepted == plain.accepted
    assert drafting.forwards == plain.forwards - 1
    assert drafting.active_forwards == plain.active_forwards - 2  # one per sequence
    if temperature:
        return  # below, the batch's one random stream would be drawn from in another order
    # 2 slots x 8 rows: the 9-token prompt (12 rows) is too long
    monkeypatch.setattr("flare.engine.stepper.DRAFTING_PREFILL_WORK", 2 * 8**2)
    mixed = decode(model, _prompts([3, 9]), params, opts)
    assert mixed.token_ids == plain.token_ids
    assert mixed.active_forwards == plain.active_forwards - 1


def test_every_round_of_one_layout_reuses_its_row_tree(flare_models, monkeypatch):
    """With a group per acceptance point every round of the same live slots has the same layout: its row tree
    is built once per decode, not once per forward."""
    from flare.model.row_tree import RowTree

    built = []
    build = RowTree.build.__func__
    monkeypatch.setattr(RowTree, "build", classmethod(lambda cls, *a: built.append(1) or build(cls, *a)))
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    out = decode(flare_models["qwen3_5"], [[3, 1, 4]], params, ArTrustOptions(gen_block=4, redraft="every", pause=0))
    assert out.forwards > 3
    assert len(built) == 1  # the rounds' tree (the prefill's rows have one group after the prompt: no tree)


def test_auto_redraft_groups_every_acceptance_point_for_small_greedy_batches(flare_models, monkeypatch):
    """redraft=auto (the default): a MASK group per acceptance point while at most AUTO_EVERY_SLOTS greedy
    sequences draft, one group otherwise or when any sequence samples; a batch that shrinks switches between
    rounds, and every sequence still gets its causal tokens."""
    from flare.decoding.ar_trust import AUTO_EVERY_SLOTS
    from flare.engine import Engine, EngineConfig
    from flare.engine.runner import CachedRunner

    model, N = flare_models["qwen3_5"], 4
    M = N - 1
    widths = []
    rows = CachedRunner.rows
    monkeypatch.setattr(CachedRunner, "rows", lambda self, tokens, *a, **k: widths.append(tokens.shape[1]) or rows(
        self, tokens, *a, **k))
    opts = ArTrustOptions(gen_block=N, pause=0)
    assert opts.redraft == "auto" and AUTO_EVERY_SLOTS == 2

    def first_round(prompts, params):
        widths.clear()
        decode(model, prompts, params, opts)
        return widths[1]  # after the drafting prefill

    greedy = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    assert first_round(_prompts([5]), greedy) == N + N * M
    assert first_round(_prompts([5, 7, 9]), greedy) == N + M
    assert first_round(_prompts([5]), SamplingParams(temperature=0.8, max_new_tokens=10, seed=1)) == N + M

    engine = Engine(model, EngineConfig(max_num_seqs=3))
    prompts = _prompts([5, 7, 9], seed=2)
    seqs = [engine.add_request(p, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True), opts)
            for p, n in zip(prompts, (4, 8, 16))]
    widths.clear()
    while engine.has_work:
        engine.step()
    assert {N + M, N + N * M} <= set(widths)  # three drafting, then one
    for p, n, seq in zip(prompts, (4, 8, 16), seqs):
        params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
        assert seq.output_ids == decode(model, [p], params).token_ids[0]


def test_a_paused_greedy_sequence_drafts_along_in_a_drafting_round(flare_models, monkeypatch):
    """A paused sequence in a round that drafts anyway: a greedy one drafts along (its rows are in the forward
    either way), a sampled one is held to its causal step (its draws follow its own verdicts only)."""
    from flare.decoding.ar_trust import ArTrustLane

    model = flare_models["qwen3_5"]
    plan = ArTrustLane.plan
    held = []

    def first_paused(self, live):
        self.pauses.left[live[0]] = max(self.pauses.left[live[0]], 1)  # the first sequence is always paused
        out = plan(self, live)
        held.append(self.held is not None)
        return out

    monkeypatch.setattr(ArTrustLane, "plan", first_paused)
    monkeypatch.setattr("flare.decoding.pacer.Pacer.next", lambda self, served, covered=None: self.kinds[0])
    prompts = [[3, 1, 4], [1, 5, 9, 2]]
    for temperature, expect in ((0.0, False), (0.8, True)):
        held.clear()
        params = SamplingParams(temperature=temperature, max_new_tokens=10, ignore_eos=True, seed=1)
        out = decode(model, prompts, params, ArTrustOptions(gen_block=4, pause=2, redraft="last"))
        assert held and set(held) == {expect}
        if not temperature:
            assert out.token_ids == decode(model, prompts, params).token_ids


@pytest.mark.parametrize("policy", ["exact_truncated", "argmax_full_verify"])
def test_sampled_laws_cover_only_the_slots_a_forward_covers(flare_models, monkeypatch, policy):
    """One sampled request in an engine of 8 slots: each round builds laws for its own rows, not for the idle
    slots' padding (they had cost 8x the laws it needed); a seeded request decodes the same as with one slot."""
    import flare.decoding.ar_trust as ar_trust
    from flare.engine import Engine, EngineConfig

    rows = []
    laws = ar_trust.filtered_probs
    monkeypatch.setattr(ar_trust, "filtered_probs", lambda logits, *a: rows.append(logits.shape[0]) or laws(
        logits, *a))
    model = flare_models["qwen3_5"]
    mode = ArTrustOptions(gen_block=4, draft_policy=policy)
    params = SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=16, ignore_eos=True, seed=5)
    outs = []
    for slots in (8, 1):
        engine = Engine(model, EngineConfig(max_num_seqs=slots))
        outs.append(engine.generate([[3, 1, 4, 1]], params, mode)[0].output_ids)
        assert rows and max(rows) <= 2 * 4  # one slot's clean and MASK rows (a group per acceptance point: 2 x 4)
        rows.clear()
    assert outs[0] == outs[1] and len(outs[0]) == 16
