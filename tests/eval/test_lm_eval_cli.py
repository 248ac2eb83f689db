"""lm-eval's own command line over the flare model, as a user runs it: no --device on a CPU-only machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from tests.eval.test_lm_harness import _tasks  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of lm-eval's default cuda device")
def test_lm_eval_cli_runs_on_the_cpu_and_ar_trust_scores_as_causal(flare_models, tiny_dirs, tmp_path):
    from flare.checkpoint import save_model

    model_dir = tmp_path / "model"
    save_model(flare_models["qwen3_5"], model_dir, tokenizer_from=tiny_dirs["qwen3_5"])
    tasks = _tasks(tmp_path / "tasks")
    scores, responses = {}, {}
    for mode in ("causal", "ar_trust:gen_block=3"):
        name, *opts = mode.split(":")
        out = tmp_path / f"out-{name}"
        args = ",".join([f"pretrained={model_dir}", f"mode={name}", "max_num_seqs=4", *opts])
        proc = subprocess.run(
            [sys.executable, "-m", "flare.eval.lm_harness", "--model", "flare", "--model_args", args,
             "--tasks", "toy_gen", "--include_path", str(tasks), "--output_path", str(out), "--log_samples"],
            capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # lm-eval asks for cuda:0 unless told otherwise; the adapter runs where it can and says so.
        assert "no CUDA device: running on the CPU" in proc.stderr
        result = json.loads(next(out.rglob("results_*.json")).read_text())
        scores[name] = result["results"]["toy_gen"]["exact_match,none"]
        samples = [json.loads(line) for line in next(out.rglob("samples_toy_gen_*.jsonl")).read_text().splitlines()]
        responses[name] = sorted((s["doc_id"], s["resps"]) for s in samples)
        assert len(responses[name]) == 4
    assert responses["ar_trust"] == responses["causal"]  # greedy AR-Trust == greedy causal, answer for answer
    assert scores["ar_trust"] == scores["causal"]
