"""The lm-evaluation-harness adapter on local task files: generate_until in a parallel mode, loglikelihood."""

from __future__ import annotations

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from flare.eval.lm_harness import FlareLM  # noqa: E402


def _tasks(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{a}=", "answer": str(2 * a), "choices": ["1", "2"],
                                        "label": 1}) + "\n" for a in range(1, 5)))
    (tmp_path / "toy_gen.yaml").write_text(f"""task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
""")
    (tmp_path / "toy_mc.yaml").write_text(f"""task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    return tmp_path


def _reference_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) from one direct forward, summed token by token, and whether every
    continuation token is the argmax after its prefix."""
    ctx, cont = tok.encode(context), tok.encode(continuation)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0].double(), dim=-1)
    total, greedy = 0.0, True
    for i, t in enumerate(cont):
        row = logp[len(ctx) + i - 1]  # the logits after the token before continuation token i
        total += float(row[t])
        greedy = greedy and int(row.argmax()) == t
    return total, greedy


def test_local_tasks_in_two_modes(flare_models, tiny_dirs, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from flare.checkpoint import save_model
    from flare.data.tokenizers import ChatTokenizer

    model, tok = flare_models["qwen3_5"], ChatTokenizer.from_dir(tiny_dirs["qwen3_5"])
    model_dir = tmp_path / "model"
    save_model(model, model_dir, tokenizer_from=tiny_dirs["qwen3_5"])
    manager = TaskManager(include_path=str(_tasks(tmp_path / "tasks")))
    outputs = {}
    for mode in ("causal", "ar_trust"):
        lm = FlareLM(pretrained=str(model_dir), mode=mode, max_num_seqs=4)
        result = simple_evaluate(model=lm, tasks=["toy_gen", "toy_mc"], task_manager=manager, log_samples=True)
        outputs[mode] = [s["resps"] for s in result["samples"]["toy_gen"]]
        assert "exact_match,none" in result["results"]["toy_gen"]
        # Multiple choice: every choice's score is the direct forward's log-likelihood, and the accuracy is that
        # of picking the most likely choice (labels are 1: " 2" after "a+a=").
        samples = result["samples"]["toy_mc"]
        assert len(samples) == 4
        correct = []
        for s in samples:
            ref = [_reference_loglikelihood(model, tok, ctx, cont) for ctx, cont in s["arguments"]]
            got = [r[0] for r in s["resps"]]
            assert [g for _, g in got] == [g for _, g in ref]
            assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in ref], rel=1e-5, abs=1e-5)
            correct.append(max(range(len(ref)), key=lambda i: ref[i][0]) == s["target"])
        assert result["results"]["toy_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    assert outputs["ar_trust"] == outputs["causal"]  # greedy AR-Trust == greedy causal, through lm-eval too

    lm = FlareLM(pretrained=str(model_dir))
    req = type("Req", (), {"args": ("1+1=", "2")})()
    (logp, greedy), = lm.loglikelihood([req])
    ref_logp, ref_greedy = _reference_loglikelihood(model, tok, "1+1=", "2")
    assert math.isfinite(logp) and logp == pytest.approx(ref_logp, rel=1e-5, abs=1e-5) and greedy is ref_greedy
    with pytest.raises(ValueError, match="takes options"):
        FlareLM(pretrained=str(model_dir), mode="ar_trust", threshold=0.5)
