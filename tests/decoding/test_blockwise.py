"""Diffusion-Trust and the low-confidence peers: cached == no-cache reference, caches untouched by denoising."""

from __future__ import annotations

import pytest
import torch

from flare.decoding import SamplingParams, make_options
from flare.engine import decode
from flare.engine.runner import CachedRunner

MODES = [
    ("diffusion_trust", {}),
    ("diffusion_trust", {"block_size": 4, "threshold": 0.5}),
    ("diffusion_trust", {"block_size": 4, "threshold": 0.5, "lookahead": 1}),
    ("low_confidence", {"lookahead": 1}),
    ("llada", {"block_size": 8, "steps": 4, "lookahead": 1}),
    ("low_confidence", {}),
    ("llada", {"block_size": 8, "steps": 4}),
    ("ar_trust", {"gen_block": 3}),
    ("ar_trust", {"gen_block": 3, "redraft": "every"}),
    ("causal", {}),
]


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next", "llama"])
@pytest.mark.parametrize("mode, options", MODES)
def test_cached_equals_reference(flare_models, family, mode, options, monkeypatch):
    # Greedy AR-Trust rounds follow the clock (flare.decoding.pacer): both sides draft always, to count forwards.
    monkeypatch.setattr("flare.decoding.pacer.Pacer.next", lambda self, served, covered=None: self.kinds[0])
    model = flare_models[family]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 90, (n,), generator=g).tolist() for n in [2, 11]]
    # (ignore_eos: a seeded draw may end a random model's answer early, which would not test the full length)
    for params in (SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True),
                   SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=10, seed=5, ignore_eos=True)):
        cached = decode(model, prompts, params, make_options(mode, options))
        ref = decode(model, prompts, params, make_options(mode, options), reference=True)
        assert cached.token_ids == ref.token_ids
        assert all(len(t) == 10 for t in cached.token_ids)
        assert cached.forwards == ref.forwards


def test_denoising_steps_leave_committed_caches_bit_identical(flare_models):
    model = flare_models["qwen3_5"]
    runner = CachedRunner(model, 2, 64)
    runner.prefill([[1, 2, 3], [4, 5]])
    before = runner.cache.clone()
    for n_clean in (0, 1, 2):
        runner.rows(torch.tensor([[7, 95, 95], [8, 9, 95]]), n_clean)
    assert torch.equal(runner.cache.lengths, before.lengths)
    for a, b in zip(runner.cache.layers, before.layers):
        if hasattr(a, "k"):  # committed KV slots; the slots past each length are scratch
            for row, n in enumerate(before.lengths.tolist()):
                assert torch.equal(a.k[row, :, :n], b.k[row, :, :n]) and torch.equal(a.v[row, :, :n], b.v[row, :, :n])
        else:
            assert torch.equal(a.conv, b.conv) and torch.equal(a.ssm, b.ssm)


def test_counters_and_stops(flare_models):
    model = flare_models["llama"]
    out = decode(model, [[3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=9), "diffusion_trust")
    assert len(out.token_ids[0]) == 9 and out.finish_reasons == ["length"]
    assert out.forwards >= 1 + 3 and 0 < out.tokens_per_forward <= 3
    stop = out.token_ids[0][4]
    cut = decode(model, [[3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=9, stop_token_ids=[stop]),
                 "diffusion_trust")
    assert cut.token_ids[0] == out.token_ids[0][: out.token_ids[0].index(stop) + 1]
    assert cut.finish_reasons == ["stop"]


@pytest.mark.parametrize("mode, options", [("low_confidence", {"threshold": 0.5}), ("llada", {"block_size": 4}),
                                           ("diffusion_trust", {"threshold": 1.0})])
def test_a_look_ahead_that_is_the_next_step_changes_no_token(flare_models, mode, options):
    """Unseeded blocks: the look-ahead rows ARE the next block's first denoising step (the same rows after the
    same committed context), so the tokens are the same, greedy or sampled, in one forward fewer per block after
    the first. A seeded block whose look-ahead can commit nothing (threshold 1) decodes greedily as without it
    (sampled, its look-ahead draws move the request's generator on)."""
    model = flare_models["qwen3_5"]
    prompts = [[5, 17, 33, 8], [9, 2]]
    runs = [SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0.9, max_new_tokens=12, seed=3, ignore_eos=True)]
    for params in runs[: 1 if mode == "diffusion_trust" else 2]:
        plain = decode(model, prompts, params, make_options(mode, options))
        ahead = decode(model, prompts, params, make_options(mode, {**options, "lookahead": 1}))
        assert ahead.token_ids == plain.token_ids
        if mode == "diffusion_trust":
            assert ahead.forwards == plain.forwards
        else:
            assert ahead.forwards < plain.forwards


def test_look_ahead_rows_are_the_training_noisy_block_after_the_committed_one(flare_models):
    """The forward that commits a block also runs the next block as T MASK rows: their logits are a fully
    masked noisy block seeded after the committed block (the layout training supervises), and the clean rows
    are the causal ones."""
    from flare.decoding.options import DiffusionTrustOptions
    from flare.engine.stepper import Admission, Stepper
    from flare.model.context import Rows

    model = flare_models["qwen3_5"]
    prompt, block = [5, 17, 33, 8], [40, 41, 42]
    stepper = Stepper(model, 1, 64)
    stepper.admit([Admission(0, DiffusionTrustOptions(block_size=3, lookahead=1), prompt,
                             SamplingParams(temperature=0, max_new_tokens=8))])
    lane = stepper.owner[0]
    with torch.inference_mode():  # a stepper's tensors change in place in that mode only (as its own methods do)
        lane.block[0], lane.undecided[0] = torch.tensor(block), False
        lane.step_of[0] = -1  # decided: the next forward commits it
        plan = lane.plan([0])
    mask = model.config.mask_token_id
    assert plan.tokens[0].tolist() == block + [mask] * 3
    assert plan.num_clean.tolist() == [3] and plan.num_noisy.tolist() == [3] and not plan.commits_all
    with torch.inference_mode():
        hidden = stepper.runner.rows(plan.tokens, plan.num_clean, plan.num_noisy)
        cache = model.new_cache(1)
        clean = model.hidden_states(torch.tensor([prompt + block]), cache=cache)[:, -3:]
        noisy = model.hidden_states(torch.full((1, 3), mask), cache=cache, layout=Rows(0))
    torch.testing.assert_close(hidden[:, :3], clean, rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden[:, 3:], noisy, rtol=0, atol=1e-5)


def test_look_ahead_commits_only_confident_positions_of_a_seeded_block(flare_models, monkeypatch):
    """Diffusion-Trust's look-ahead step did not see the block's seed: nothing is forced, so a threshold no
    prediction passes leaves every MASK position undecided; a low one commits the confident ones at once, and
    the block then needs fewer forwards."""
    model = flare_models["llama"]
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    low = decode(model, [[3, 4, 5]], params, make_options("diffusion_trust", {"threshold": 1e-6, "lookahead": 1}))
    plain = decode(model, [[3, 4, 5]], params, make_options("diffusion_trust", {"threshold": 1e-6}))
    # Everything passes: each block is decided by its look-ahead, one forward per block after the first.
    assert low.forwards < plain.forwards
    assert len(low.token_ids[0]) == 24


@pytest.mark.parametrize(
    "mode, options, message",
    [
        ("diffusion_trust", {"lookahead": 2}, "lookahead"),
        ("diffusion_trust", {"block_size": 0}, "block_size"),
        ("low_confidence", {"threshold": 0.0}, "threshold"),
        ("low_confidence", {"threshold": 1.5}, "threshold"),
        ("llada", {"steps": 0}, "steps"),
        ("diffusion_trust", {"gen_block": 4}, "takes options"),
    ],
)
def test_bad_options(flare_models, mode, options, message):
    with pytest.raises(ValueError, match=message):
        decode(flare_models["qwen3_5"], [[1]], SamplingParams(), make_options(mode, options))


@pytest.mark.parametrize("mode", ["diffusion_trust", "low_confidence", "llada"])
def test_diffusion_modes_need_a_mask_token(tiny_models, mode):
    with pytest.raises(ValueError, match="mask token"):
        decode(tiny_models["qwen3_5"][0], [[1]], SamplingParams(), mode)


def test_every_prediction_a_step_reads_comes_from_a_clean_or_mask_row():
    """Rows of a denoising step (row_inputs): the decided prefix is clean; position j (read from row j-1) is
    never predicted by an unmasked noisy row, whose output the objective never trains; a decided position whose
    row's prediction is not needed shows its token."""
    from flare.decoding.blockwise import row_inputs

    MASK, T = 99, 5
    block = torch.arange(1, T + 1).expand(2 ** T, T).clone()
    undecided = torch.tensor([[(i >> j) & 1 == 1 for j in range(T)] for i in range(2 ** T)])
    rows, prefix = row_inputs(block, undecided, MASK)
    for b in range(2 ** T):
        u = undecided[b].tolist()
        p = u.index(True) if True in u else T
        assert prefix[b] == p
        for i in range(T):
            shown = rows[b, i] != MASK
            needed = i + 1 < T and u[i + 1]
            if i < p:
                assert shown  # clean row: its causal prediction is exact whatever it is needed for
            elif needed:
                assert not shown  # a MASK row predicts the next, still undecided, position
            else:
                assert shown == (not u[i])


def test_a_decided_prefix_step_reads_the_causal_distribution(flare_models):
    """Seed and next position decided, the last undecided: the logits the step reads for it are the causal
    model's after [prompt, seed, next] (before the rule, they came from an untrained unmasked noisy row)."""
    from flare.decoding.options import DiffusionTrustOptions
    from flare.engine.stepper import Admission, Stepper

    model = flare_models["qwen3_5"]
    prompt = [5, 17, 33, 8]
    stepper = Stepper(model, 1, 64)
    stepper.admit([Admission(0, DiffusionTrustOptions(block_size=3), prompt,
                             SamplingParams(temperature=0, max_new_tokens=8))])
    lane = stepper.owner[0]
    seed, nxt = 40, 41
    with torch.inference_mode():  # a stepper's tensors change in place in that mode only (as its own methods do)
        lane.block[0] = torch.tensor([seed, nxt, lane.mask_id])
        lane.undecided[0] = torch.tensor([False, False, True])
        plan = lane.plan([0])
    assert plan.num_clean.tolist() == [2] and plan.num_noisy.tolist() == [1]
    with torch.inference_mode():
        logits = model.logits(stepper.runner.rows(plan.tokens, plan.num_clean, plan.num_noisy))
        causal = model(torch.tensor([prompt + [seed, nxt]]))[0, -1]
    torch.testing.assert_close(logits[0, 1], causal, rtol=0, atol=1e-5)  # [MASK]'s -inf included


def test_a_mode_running_more_mask_rows_than_the_training_block_warns(flare_models):
    import copy
    import warnings

    model = copy.deepcopy(flare_models["llama"])
    model.config.block_size = 3
    params = SamplingParams(temperature=0, max_new_tokens=4)
    for mode, options, rows in [("low_confidence", {"block_size": 4}, 4), ("ar_trust", {"gen_block": 6}, 5),
                                ("llada", {"block_size": 32}, 32), ("diffusion_trust", {"block_size": 5}, 4)]:
        with pytest.warns(UserWarning, match=f"runs {rows} MASK rows in a row.*noisy blocks of 3"):
            decode(model, [[3, 4]], params, make_options(mode, options))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Every mode's defaults come from the recorded block, so none of them runs untrained rows.
        for mode in ("diffusion_trust", "ar_trust", "low_confidence", "llada"):
            decode(model, [[3, 4]], params, mode)


@pytest.mark.parametrize("mode, temperature", [("diffusion_trust:lookahead=1", 0.0), ("diffusion_trust", 0.9),
                                               ("low_confidence", 0.0)])
def test_denoising_reads_only_the_slots_a_forward_covers(flare_models, monkeypatch, mode, temperature):
    """One request in an engine of 8 slots: each denoising step's distributions cover its own slot, not the idle
    slots' padding, and it decodes the same tokens as with one slot (seeded where it samples)."""
    from flare.decoding import parse_mode
    from flare.decoding.blockwise import BlockLane
    from flare.engine import Engine, EngineConfig

    rows = []
    denoise = BlockLane._denoise
    monkeypatch.setattr(BlockLane, "_denoise", lambda self, slots, logits, *a, **k: rows.append(
        logits.shape[0]) or denoise(self, slots, logits, *a, **k))
    model = flare_models["qwen3_5"]
    params = SamplingParams(temperature=temperature, max_new_tokens=12, ignore_eos=True, seed=2)
    outs = []
    for slots in (8, 1):
        engine = Engine(model, EngineConfig(max_num_seqs=slots))
        outs.append(engine.generate([[3, 1, 4, 1]], params, parse_mode(mode))[0].output_ids)
        assert rows and set(rows) == {1}
        rows.clear()
    assert outs[0] == outs[1] and len(outs[0]) == 12
