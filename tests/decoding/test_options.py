"""Mode options: one typed object, read from text and JSON by one converter, defaults from the checkpoint."""

from __future__ import annotations

import pytest

from flare.config import DEFAULT_BLOCK_SIZE
from flare.decoding import (
    ArTrustOptions,
    CausalOptions,
    DiffusionTrustOptions,
    LladaOptions,
    LowConfidenceOptions,
    as_options,
    check_request,
    mode_from_json,
    parse_mode,
    parse_modes,
)
from flare.objective import ObjectiveConfig


def test_text_is_typed_by_the_dataclass_field():
    assert parse_mode("causal") == CausalOptions()
    assert parse_mode(" low_confidence:block_size=3 ") == LowConfidenceOptions(block_size=3)
    got = parse_mode("llada:block_size=8:steps=4")
    assert got == LladaOptions(block_size=8, steps=4) and type(got.steps) is int
    thr = parse_mode("diffusion_trust:threshold=1")  # an integer written for a float field is a float
    assert thr == DiffusionTrustOptions(threshold=1.0) and type(thr.threshold) is float
    assert parse_mode("ar_trust:draft_policy=argmax_full_verify") == ArTrustOptions(draft_policy="argmax_full_verify")
    assert parse_mode("llada:threshold=0.5:steps=none") == LladaOptions(threshold=0.5)
    assert parse_modes("causal, ar_trust:gen_block=5") == [CausalOptions(), ArTrustOptions(gen_block=5)]


@pytest.mark.parametrize("text, message", [
    ("fast", "unknown decoding mode 'fast'"),
    ("ar_trust:gen_block=four", "gen_block takes int"),
    ("ar_trust:gen_block=4.5", "gen_block takes int"),
    ("ar_trust:gen_block", "not key=value"),
    ("ar_trust:threshold=0.5", "takes options"),
    ("ar_trust:gen_block=1", "gen_block"),
    ("ar_trust:draft_policy=greedy", "draft_policy"),
    ("low_confidence:threshold=0", "threshold"),
    ("low_confidence:threshold=1.5", "threshold"),
    ("diffusion_trust:block_size=0", "block_size"),
    ("llada:steps=0", "steps"),
    ("low_confidence:steps=4", "not both"),
    ("causal:gen_block=4", "takes options none"),
])
def test_bad_text_names_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_mode(text)
    with pytest.raises(ValueError, match="no modes"):
        parse_modes(" , ")


def test_json_is_checked_by_type_never_guessed():
    assert mode_from_json({"mode": "ar_trust", "gen_block": 3}, "causal") == ArTrustOptions(gen_block=3)
    assert mode_from_json({"gen_block": 3}, "ar_trust") == ArTrustOptions(gen_block=3)  # the server's default mode
    assert mode_from_json({"mode": "diffusion_trust", "threshold": 1}, "causal").threshold == 1.0
    # No mode: the server's default options, the ones given here replacing theirs.
    server = ArTrustOptions(gen_block=3, redraft="every")
    assert mode_from_json({}, server) == server
    assert mode_from_json({"draft_policy": "argmax_truncated"}, server) == ArTrustOptions(
        gen_block=3, redraft="every", draft_policy="argmax_truncated")
    assert mode_from_json({"mode": "ar_trust"}, server) == ArTrustOptions()  # a named mode: its own defaults
    for bad, message in [({"mode": "ar_trust", "gen_block": True}, "gen_block takes int"),
                         ({"mode": "ar_trust", "gen_block": 3.0}, "gen_block takes int"),
                         ({"mode": "ar_trust", "draft_policy": 1}, "draft_policy takes str"),
                         ({"mode": 7}, "flare.mode must be a string"),
                         ({"mode": "ar_trust", "block_size": 3}, "takes options")]:
        with pytest.raises(ValueError, match=message):
            mode_from_json(bad, "causal")


@pytest.mark.parametrize("options", [
    CausalOptions(), ArTrustOptions(), ArTrustOptions(gen_block=6, draft_policy="argmax_truncated"),
    DiffusionTrustOptions(block_size=4, threshold=0.5), LowConfidenceOptions(), LladaOptions(block_size=8, steps=2),
])
def test_label_and_json_read_back_to_the_same_options(options):
    assert parse_mode(options.label()) == options
    assert mode_from_json(options.to_json(), "causal") == options
    assert as_options(options) is options and as_options(None, options) is options


def test_defaults_come_from_the_checkpoint_block(flare_models):
    import copy

    config = copy.deepcopy(flare_models["llama"].config)
    for recorded, b in [(None, DEFAULT_BLOCK_SIZE), (5, 5), (2, 2)]:
        config.block_size = recorded
        resolve = lambda text: check_request(config, [[1, 2]], parse_mode(text))  # noqa: E731
        assert resolve("ar_trust").gen_block == b + 1  # b MASK rows draft
        assert resolve("diffusion_trust").block_size == b  # [seed, MASK x (b-1)]: the method's block 3 at b = 3
        assert resolve("low_confidence").block_size == b
        assert resolve("llada") == LladaOptions(block_size=b, steps=-(-b // 2))
        assert resolve("ar_trust:gen_block=3").gen_block == 3  # given values win
    assert ObjectiveConfig().block_size == DEFAULT_BLOCK_SIZE  # training and decoding share one default


def test_the_request_check_refuses_what_the_checkpoint_cannot_run(tiny_models, flare_models):
    ar = tiny_models["qwen3_5"][0].config
    with pytest.raises(ValueError, match="mask token"):
        check_request(ar, [[1]], ArTrustOptions())
    assert check_request(ar, [[1]], CausalOptions()) == CausalOptions()
    config = flare_models["qwen3_5"].config
    for prompts, message in [([], "no prompts"), ([[]], "empty"), ([[1], [config.vocab_size]], "prompt 1"),
                             ([[True]], "outside the vocabulary")]:
        with pytest.raises(ValueError, match=message):
            check_request(config, prompts, CausalOptions())


def test_every_cli_option_flag_comes_from_the_dataclasses():
    import dataclasses

    from flare.cli import build_parser
    from flare.decoding import OPTIONS

    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    flags = {a.dest: a for a in gen._actions}
    fields = {f.name for cls in OPTIONS.values() for f in dataclasses.fields(cls)}
    assert fields <= flags.keys()
    assert "(default: diffusion_trust 0.95, low_confidence 0.9)" in flags["threshold"].help
    assert all(mode in flags["mode"].help for mode in OPTIONS)
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt-ids", "1", "--mode", "llada",
                                      "--block-size", "8", "--steps", "2"])
    from flare.cli import _mode_from_args

    assert _mode_from_args(args) == LladaOptions(block_size=8, steps=2)
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt-ids", "1", "--gen-block", "3"])
    with pytest.raises(ValueError, match="mode 'causal' takes options none, not \\['gen_block'\\]"):
        _mode_from_args(args)
