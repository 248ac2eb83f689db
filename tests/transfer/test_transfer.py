"""Transfer-data tools on a tiny model: scores match a direct NLL, distilled rows are training rows, filters say
why."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import pytest
import torch

from flare.data import PackedDataset, parse_row, render
from flare.data.jsonl import read_jsonl
from flare.engine import EngineConfig
from flare.engine.llm import LLM
from flare.testing.toy import toy_ar_checkpoint
from flare.transfer.distill import DistillConfig, distill_rows
from flare.transfer.filter import FilterConfig, filter_rows
from flare.transfer.score import score_rows, summarize

ROWS = [
    {"messages": [{"role": "user", "content": "What is 1+2?"}, {"role": "assistant", "content": "Answer: 3"}],
     "answer": "3"},
    {"messages": [{"role": "user", "content": "What is 10+20?"},
                  {"role": "assistant", "content": "0+0=0. 1+2=3. Answer: 30"}], "answer": "30"},
    {"messages": [{"role": "user", "content": "no answer turn"}]},
    {"prompt": "What is 4+4?", "response": "Answer: 8"},
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_ar_checkpoint(tmp_path_factory.mktemp("seed") / "ar", seed=3)


def test_scores_equal_a_direct_nll_and_are_deterministic(toy):
    llm = LLM.from_dir(toy)
    rows = list(enumerate(ROWS, start=1))
    records = score_rows(llm.model, llm.tokenizer, rows, batch_tokens=64, progress=False)
    other = score_rows(llm.model, llm.tokenizer, rows, batch_tokens=4096, progress=False)  # other batching
    for a, b in zip(records, other):
        assert a.keys() == b.keys() and abs(a.get("nll", 0) - b.get("nll", 0)) < 1e-5
    assert [r["line"] for r in records] == [1, 2, 3, 4]
    assert records[2] == {"line": 3, "rejected": "no_assistant"}
    doc = render(parse_row(ROWS[1]), llm.tokenizer)
    ids = torch.tensor([doc.input_ids])
    with torch.no_grad():
        logp = torch.log_softmax(llm.model(ids)[0, :-1].float(), -1)
    mask = torch.tensor(doc.loss_mask[1:])
    nll = -logp.gather(-1, ids[0, 1:, None])[:, 0][mask].mean().item()
    assert abs(records[1]["nll"] - nll) < 1e-4 and records[1]["tokens"] == int(mask.sum())
    assert abs(records[1]["ppl"] - math.exp(nll)) < 1e-3
    summary = summarize(records)
    assert summary["scored"] == 3 and summary["rejected"] == {"no_assistant": 1}
    assert min(r["nll"] for r in records if "nll" in r) <= summary["mean_nll"] <= max(
        r["nll"] for r in records if "nll" in r)


def test_distilled_rows_are_training_rows(toy, tmp_path):
    llm = LLM.from_dir(toy, config=EngineConfig(max_num_seqs=4))
    prompts = list(enumerate([ROWS[0], ROWS[1], {"question": "What is 2+2?"}, {"nothing": 1}], start=1))
    config = DistillConfig(max_tokens=12, temperature=0.0)
    out, counts, bad = distill_rows(llm, prompts, config, progress=False)
    again, _, _ = distill_rows(llm, prompts, config, progress=False)
    assert out == again  # deterministic at a fixed seed
    assert bad == [(4, "expected 'messages', 'prompt' or 'question'")]
    assert counts["kept"] + counts["truncated"] + counts["empty"] + counts["bad_think_tags"] == 3
    # The rows a distillation writes, from known model texts: think blocks, truncation, broken tags.
    texts = ["<think>\nadd the ones\n</think>\n\nAnswer: 3", "Answer: 30", "<think>never closed"]
    reasons = ["stop", "stop", "stop"]

    class Done:
        def __init__(self, i):
            self.text, self.finish_reason = texts[i], reasons[i]

    llm.generate = lambda p, params, mode, progress=None: [Done(i) for i in range(len(p))]
    out, counts, _ = distill_rows(llm, prompts[:3], DistillConfig(temperature=0.7, seed=5), progress=False)
    assert counts == {"kept": 2, "truncated": 0, "bad_think_tags": 1, "wrong_answer": 0, "empty": 0}
    assert out[0]["messages"][-1] == {"role": "assistant", "content": "Answer: 3", "reasoning_content": "add the ones"}
    assert out[0]["distill"]["temperature"] == 0.7 and out[0]["distill"]["source_line"] == 1
    assert out[1]["messages"][0] == {"role": "user", "content": "What is 10+20?"} and out[1]["answer"] == "30"
    path = tmp_path / "distilled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    ds = PackedDataset.from_jsonl(path, llm.tokenizer, seq_len=256, block_size=4, on_error="raise")
    assert ds.stats["documents"] == 2, dict(ds.stats)
    with pytest.raises(ValueError, match="answer"):
        distill_rows(llm, [(1, {"question": "x"})], DistillConfig(verify="strict"), progress=False)


def test_verification_keeps_only_correct_answers(toy):
    llm = LLM.from_dir(toy)
    # A fake model answer: replace generate with known texts to test the verifier alone.
    texts = {0: "Answer: 3", 1: "Answer: 31"}

    class Done:
        def __init__(self, i):
            self.text, self.finish_reason = texts[i], "stop"

    llm.generate = lambda prompts, params, mode, progress=None: [Done(i) for i in range(len(prompts))]
    out, counts, _ = distill_rows(llm, list(enumerate(ROWS[:2], start=1)), DistillConfig(verify="strict"),
                                  progress=False)
    assert [r["answer"] for r in out] == ["3"] and counts["wrong_answer"] == 1
    # A caller's own check (a task's scorer) replaces --verify, and needs no 'answer' in the rows.
    seen = []
    out, counts, _ = distill_rows(llm, [(7, {"question": "a"}), (9, {"question": "b"})],
                                  DistillConfig(verify="strict"), progress=False,
                                  check=lambda line, text: seen.append((line, text)) or line == 9)
    assert seen == [(7, "Answer: 3"), (9, "Answer: 31")] and counts["wrong_answer"] == 1
    assert [r["distill"]["source_line"] for r in out] == [9]


def test_filter_reasons():
    scores = {1: {"line": 1, "tokens": 5, "nll": 0.5}, 2: {"line": 2, "tokens": 50, "nll": 2.5},
              3: {"line": 3, "rejected": "no_assistant"}, 4: {"line": 4, "tokens": 1, "nll": 0.1}}
    rows = [(i, {"i": i}) for i in range(1, 6)]
    kept, counts, dropped = filter_rows(rows, scores, FilterConfig(max_nll=2.0, min_tokens=2))
    assert kept == [{"i": 1}]
    assert dict(dropped) == {2: "nll_above_max", 3: "rejected:no_assistant", 4: "too_short", 5: "no_score"}
    assert counts == {"kept": 1, "nll_above_max": 1, "rejected:no_assistant": 1, "too_short": 1, "no_score": 1}
    with pytest.raises(ValueError, match="nothing could pass"):
        FilterConfig(min_nll=3, max_nll=1)


def test_cli_score_then_filter(toy, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "{broken\n")
    out = tmp_path / "scores.jsonl"
    run = [sys.executable, "-m", "flare", "data"]
    proc = subprocess.run(run + ["score", "--model", str(toy), "--data", str(data), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["scored"] == 3 and (tmp_path / "scores.summary.json").exists() and (tmp_path / "scores.png").exists()
    proc = subprocess.run(run + ["filter", "--data", str(data), "--scores", str(out), "--out",
                                 str(tmp_path / "kept.jsonl"), "--max-nll", "100"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kept"] == 3
    dropped = [r for _, r in read_jsonl(tmp_path / "kept.dropped.jsonl")]
    assert dropped == [{"line": 3, "reason": "rejected:no_assistant"}]
