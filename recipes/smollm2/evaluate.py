"""Stage ``evaluate``: the seed and the converted model on held-out problems, every mode, in float32.

Models: the seed (causal), and each checkpoint kept along conversion training (``train.CHECKPOINTS``) in every
mode (``MODES``), greedy, each task's token budget (``tasks.max_new_tokens``). The last checkpoint answers every
evaluation problem of every chosen task, transfer and held-out (``tasks.eval_task``); earlier checkpoints answer
the first ``TREND_PROBLEMS`` of each transfer task (the same problems the seed answered first: reasoning-gym
draws problem i from seed + i), for the trend against conversion tokens.

Beside task accuracy, two measures that do not depend on it, per checkpoint and task: the converted model's
greedy agreement with the seed (the share of identical causal continuations, and the mean length of the
identical prefix), and the mean NLL of the seed's own greedy answers under the converted model against under
the seed (``flare.transfer.score_rows``). Float32 keeps AR-Trust exact: its tokens at temperature 0 are the
causal ones, which ``same_as_causal`` checks on every problem.

Each (model, task) result goes to ``eval/MODEL/TASK.json`` as it finishes (a killed run resumes there);
``eval.json`` collects them with the plan.
"""

from __future__ import annotations

import time

from recipes.smollm2 import tasks, train
from recipes.smollm2.common import DTYPE, Run, read_json, remove_temporaries, write_json
from recipes.smollm2.survey import file_name

# AR-Trust always drafting (pause=0): its tokens per forward and acceptance measure the drafts. By default a
# greedy batch is paced by the clock (flare.decoding.pacer), and in float32 on a CPU, where a round of 9 rows
# costs nearly twice a causal step, it runs causal steps on tasks the drafts rarely fit; the speed stage
# measures that default.
# Diffusion-Trust twice: the method's (a commit forward per block) and with look-ahead (the commit forward also
# runs the next block's MASK rows as its first denoising step), kept apart as ``LOOKAHEAD``.
MODES = "causal,ar_trust:pause=0,diffusion_trust,diffusion_trust:lookahead=1"
LOOKAHEAD = "diffusion_trust:lookahead=1"
TREND_PROBLEMS, QUICK_TREND_PROBLEMS = 16, 2
MAX_NUM_SEQS = 16


def models(run: Run) -> list[tuple[str, str, object]]:
    """(name, modes, checkpoint directory), the seed first, the final checkpoint last."""
    return [("seed", "causal", run.seed)] + [(p.name, MODES, p) for p in train.checkpoints(run)]


def plan(run: Run) -> dict:
    chosen = tasks.chosen(run)
    return {"tasks": chosen, "models": [name for name, _, _ in models(run)], "modes": MODES, "dtype": DTYPE,
            "problems": tasks.QUICK_EVAL_PROBLEMS if run.quick else tasks.EVAL_PROBLEMS,
            "trend_problems": QUICK_TREND_PROBLEMS if run.quick else TREND_PROBLEMS}


def done(run: Run) -> bool:
    summary = read_json(run.work / "eval.json")
    return train.done(run) and summary is not None and summary.get("plan") == plan(run)


def result_key(result) -> str:
    """A mode's key in a task's results: its mode name (``LOOKAHEAD`` for Diffusion-Trust with look-ahead)."""
    return LOOKAHEAD if result.mode == "diffusion_trust" and result.options.get("lookahead") else result.mode


def agreement(ours: list[list[int]], seed: list[list[int]]) -> dict:
    """Share of identical continuations and the mean length of the identical prefix (in tokens)."""
    def prefix(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    return {"identical": sum(a == b for a, b in zip(ours, seed)) / len(seed),
            "mean_identical_prefix": sum(prefix(a, b) for a, b in zip(ours, seed)) / len(seed),
            "mean_seed_tokens": sum(map(len, seed)) / len(seed)}


def answer_nll(llm, items, texts: list[str]) -> list[dict]:
    """Per (question, answer): the model's mean NLL of the answer's tokens through the chat template."""
    from flare.transfer.score import score_rows

    rows = [(i, {"messages": [{"role": "user", "content": item.question}, {"role": "assistant", "content": text}]})
            for i, (item, text) in enumerate(zip(items, texts))]
    return score_rows(llm.model, llm.tokenizer, rows, progress=False)


def evaluate_model(llm, run: Run, name: str, modes: str, specs: list[str], problems: int,
                   seed_rows: dict | None) -> dict:
    """One model on ``specs``: per task, per mode, the harness's result with per-problem outputs."""
    from flare.decoding import SamplingParams, parse_modes
    from flare.eval import evaluate
    from flare.transfer.score import summarize

    folder = run.work / "eval" / name
    folder.mkdir(parents=True, exist_ok=True)
    remove_temporaries(folder, ".*.tmp-*")
    out = {}
    for spec in specs:
        path = folder / f"{file_name(spec)}.json"
        row = read_json(path)
        if row is None or row.get("problems") != problems or row.get("modes") != modes:
            task = tasks.eval_task(run, spec)
            task.items = task.items[:problems]
            params = SamplingParams(temperature=0, max_new_tokens=tasks.max_new_tokens(spec))
            report = evaluate(llm, task, parse_modes(modes), params, progress=True, keep_outputs=True)
            row = {"task": spec, "problems": problems, "modes": modes,
                   "results": {result_key(r): r.__dict__ | {"label": r.label} for r in report.results},
                   "not_run": report.not_run}
            seed_texts = row["results"]["causal"]["responses"] if seed_rows is None else \
                seed_rows[spec]["results"]["causal"]["responses"][:problems]
            # Per problem, this model's NLL of the seed's greedy answer (for the seed: of its own).
            row["seed_answer_nll"] = answer_nll(llm, task.items, seed_texts)
            if seed_rows is not None:  # a converted checkpoint: compare with the seed on the same problems
                row["agreement"] = agreement(row["results"]["causal"]["token_ids"],
                                             seed_rows[spec]["results"]["causal"]["token_ids"][:problems])
                row["nll"] = {"converted": summarize(row["seed_answer_nll"]).get("mean_nll"),
                              "seed": summarize(seed_rows[spec]["seed_answer_nll"][:problems]).get("mean_nll")}
            write_json(path, row)
        out[spec] = row
        causal = row["results"]["causal"]
        print(f"  {name} {spec}: causal {causal['accuracy']:.3f}" + "".join(
            f", {m} {r['accuracy']:.3f} at {r['tokens_per_forward']:.2f} tok/fwd"
            for m, r in row["results"].items() if m != "causal"), flush=True)
    return out


PER_PROBLEM = ("scores", "forwards", "token_ids", "responses", "examples")


def brief(row: dict) -> dict:
    """A (model, task) result without its per-problem lists (they stay in ``eval/MODEL/TASK.json``)."""
    return {**{k: v for k, v in row.items() if k != "seed_answer_nll"},
            "results": {m: {k: v for k, v in r.items() if k not in PER_PROBLEM} for m, r in row["results"].items()}}


def make(run: Run) -> None:
    from flare.engine import EngineConfig
    from flare.engine.llm import LLM

    if not train.done(run):
        raise SystemExit(f"no trained checkpoints in {run.train}: run the train stage first")
    p = plan(run)
    start = time.perf_counter()
    every = p["tasks"]["transfer"] + p["tasks"]["held_out"]
    results, seed_rows = {}, None
    for name, modes, path in models(run):
        final = name == p["models"][-1]
        llm = LLM.from_dir(path, dtype=DTYPE, config=EngineConfig(max_num_seqs=MAX_NUM_SEQS))
        specs, problems = (every, p["problems"]) if name == "seed" or final else (
            p["tasks"]["transfer"], p["trend_problems"])
        results[name] = evaluate_model(llm, run, name, modes, specs, problems, seed_rows)
        if name == "seed":
            seed_rows = results[name]
    write_json(run.work / "eval.json", {"plan": p, "results": {m: {t: brief(r) for t, r in rows.items()}
                                                               for m, rows in results.items()},
                                        "seconds": round(time.perf_counter() - start, 1)})
