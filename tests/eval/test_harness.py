"""The harness through the engine: AR-Trust at T=0 agrees with causal exactly; throughput waves are exact."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from flare.data.tokenizers import ChatTokenizer
from flare.decoding import SamplingParams
from flare.engine import EngineConfig
from flare.engine.llm import LLM
from flare.eval import EngineTarget, EvalItem, HttpTarget, Task, evaluate, parse_modes, run_waves
from flare.eval.plots import accuracy_plot, throughput_plot
from flare.eval.report import accuracy_table, throughput_table


@pytest.fixture(scope="module")
def llm(flare_models, tiny_dirs):
    return LLM(copy.deepcopy(flare_models["qwen3_5"]), ChatTokenizer.from_dir(tiny_dirs["qwen3_5"]),
               EngineConfig(max_num_seqs=8), name="tiny")


def _task(llm, questions):
    """References = the causal answers, so causal scores 100% and any other mode scores its agreement."""
    params = SamplingParams(temperature=0, max_new_tokens=12)
    prompts = [llm.chat_ids([{"role": "user", "content": q}]) for q in questions]
    answers = [c.text for c in llm.generate(prompts, params)]
    return Task("echo", [EvalItem(q, a, lambda r, a=a: float(r == a)) for q, a in zip(questions, answers)]), params


def test_evaluate_modes(llm, tmp_path):
    task, params = _task(llm, ["1+2", "30+4", "5+66", "7+8", "9+10", "11+12"])
    report = evaluate(llm, task, parse_modes("ar_trust,causal,diffusion_trust"), params, progress=False)
    assert [r.mode for r in report.results] == ["causal", "ar_trust", "diffusion_trust"]
    causal, trust = report.result("causal"), report.result("ar_trust")
    assert causal.accuracy == 1.0 and causal.tokens_per_forward == 1.0
    assert trust.accuracy == 1.0 and trust.same_as_causal == 1.0 and trust.acceptance is not None
    assert trust.new_tokens == causal.new_tokens and trust.tokens_per_forward > 0.5
    table = accuracy_table(report)
    assert "| ar_trust | 100.0% |" in table and "speed-up" in table
    png = accuracy_plot(report, tmp_path / "acc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(report.to_dict())


def test_ar_checkpoints_skip_parallel_modes(tiny_models, tiny_dirs):
    llm = LLM(tiny_models["llama"][0], ChatTokenizer.from_dir(tiny_dirs["llama"]), name="ar")
    task = Task("t", [EvalItem("1+1", "2", lambda r: 0.0)])
    report = evaluate(llm, task, parse_modes("causal,ar_trust"), SamplingParams(temperature=0, max_new_tokens=4),
                      progress=False)
    assert [r.mode for r in report.results] == ["causal"] and "flare convert" in report.not_run["ar_trust"]
    with pytest.raises(ValueError, match="unknown decoding modes"):
        parse_modes("causal,fast")


def test_parse_modes_with_options():
    assert parse_modes("causal, low_confidence:block_size=3 ,llada:block_size=8:steps=4") == [
        ("causal", {}), ("low_confidence", {"block_size": 3}), ("llada", {"block_size": 8, "steps": 4})]
    assert parse_modes("diffusion_trust:threshold=0.9") == [("diffusion_trust", {"threshold": 0.9})]
    assert parse_modes("server,causal", server=True) == [(None, {}), ("causal", {})]  # flare bench's entry
    assert parse_modes("ar_trust:draft_policy=argmax_full_verify") == [
        ("ar_trust", {"draft_policy": "argmax_full_verify"})]
    for bad, message in [("low_confidence:block_size", "not key=value"), ("low_confidence:=3", "not key=value"),
                         ("low_confidence:size=3", "takes options"), ("low_confidence:block_size=0", "block_size"),
                         ("", "no modes"), ("server", "unknown decoding modes")]:
        with pytest.raises(ValueError, match=message):
            parse_modes(bad)


def test_waves_in_process_and_over_http(llm, tmp_path):
    from tests.serve.conftest import LiveServer

    questions = ["1+1", "2+2", "3+3"]
    runs = [run_waves(EngineTarget(llm), questions, mode, c, max_tokens=7, waves=2)
            for mode in ("causal", "ar_trust") for c in (1, 3)]
    assert all(r.valid and r.tokens == r.concurrency * 2 * 7 for r in runs)
    assert runs[0].tokens_per_forward == 1.0 and runs[2].tokens_per_forward > 0.5
    live = LiveServer(llm)
    try:
        http = run_waves(HttpTarget(live.base_url), questions, "ar_trust", 2, max_tokens=5, waves=1)
        foreign = run_waves(HttpTarget(live.base_url, "tiny"), questions, None, 2, max_tokens=5, waves=1)
        peer = run_waves(HttpTarget(live.base_url), questions, "low_confidence", 2, max_tokens=5, waves=1,
                         options={"block_size": 2})
        with pytest.raises(RuntimeError, match="HTTP 400.*block_size"):  # the options reach the server
            run_waves(HttpTarget(live.base_url), questions, "low_confidence", 2, max_tokens=5, waves=1,
                      options={"block_size": 0})
    finally:
        live.stop()
    assert peer.valid and peer.mode == "low_confidence:block_size=2"
    assert "| low_confidence:block_size=2 | 2 |" in throughput_table(runs + [peer])
    assert http.valid and http.tokens == 10 and http.tokens_per_forward is not None
    assert foreign.valid and foreign.mode == "server default"
    table = throughput_table(runs + [http])
    assert "vs causal" in table and "| ar_trust | 3 |" in table
    assert throughput_plot(runs, tmp_path / "t.png").exists()


def test_flare_eval_cli_on_a_gsm8k_file(tiny_dirs, tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\nnot json\n"
                    + json.dumps({"question": "2+2?", "answer": "#### 4"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "flare", "eval", "--model", str(tiny_dirs["qwen3_5"]), "--task",
                           str(path), "--modes", "causal", "--max-tokens", "4", "--json", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "line 2" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["questions"] == 2 and report["skipped_rows"] == [[2, "not JSON (Expecting value)"]]
    assert report["results"][0]["mode"] == "causal"
    assert (tmp_path / "out" / "accuracy_vs_tpf.png").exists()
