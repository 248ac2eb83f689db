"""Stage ``distill``: transfer data from the seed's own answers (method §5: self-distillation).

For each transfer task (``tasks.chosen``): ``PROBLEMS`` problems from the reserved transfer seeds, less every
question whose text is also an evaluation problem's or an earlier transfer problem's (small tasks repeat
questions), answered by the seed through its chat template in float32 by ``flare.transfer.distill_rows``: one
greedy answer and ``SAMPLES`` sampled ones (temperature ``TEMPERATURE``), each kept only when the task's own
scorer accepts it (as the evaluation reads answers) and not a repeat of an answer kept for the same question.
Writes ``transfer.jsonl`` (chat rows, the task and reference in each) and ``transfer.json`` (the plan, and per
task: problems, repeats dropped, answers kept and dropped by reason).
"""

from __future__ import annotations

import json
import time

from recipes.smollm2 import tasks
from recipes.smollm2.common import DTYPE, Run, read_json, remove_temporaries, seed_for, write_json

# 1,000 draws per task: products and chain_sum repeat after ~60 / ~120 distinct questions, letter_counting keeps
# giving new words, so most of the extra rows are letter counts. Sampling at 0.8 ran past the answer budget on most
# problems (49 of 60 products in the first full run); 0.5 keeps the seed's phrasing with fewer rambles.
PROBLEMS, QUICK_PROBLEMS = 1000, 6
SAMPLES, TEMPERATURE = 1, 0.5
MAX_NUM_SEQS = 16


def plan(run: Run) -> dict:
    count = QUICK_PROBLEMS if run.quick else PROBLEMS
    return {"tasks": tasks.chosen(run)["transfer"], "problems": count, "seed": seed_for("transfer", count),
            "samples": SAMPLES, "temperature": TEMPERATURE, "dtype": DTYPE,
            "eval_problems": tasks.QUICK_EVAL_PROBLEMS if run.quick else tasks.EVAL_PROBLEMS}


def done(run: Run) -> bool:
    summary = read_json(run.transfer.with_suffix(".json"))
    return summary is not None and summary.get("plan") == plan(run) and run.transfer.is_file()


def accepted(item, response: str) -> bool:
    """Whether a seed answer joins the transfer data: the task's own scorer gives it full marks."""
    return item.scorer(response) >= 1.0


def distill_task(llm, run: Run, spec: str, count: int, seed: int) -> tuple[list[dict], dict]:
    """Kept rows of one task and its counts."""
    from flare.eval import load_task
    from flare.transfer.distill import DistillConfig, distill_rows

    banned = {item.question for item in tasks.eval_task(run, spec).items}
    items, repeats = [], 0
    for item in load_task(f"reasoning_gym:{spec}", count, seed).items:
        if item.question in banned:
            repeats += 1
            continue
        banned.add(item.question)
        items.append(item)
    rows = [(i, {"question": item.question}) for i, item in enumerate(items)]
    out, counts = [], {"problems": count, "repeats_dropped": repeats, "distinct": len(items)}
    seen: set[tuple[str, str]] = set()
    passes = [DistillConfig(temperature=0.0)] + [
        DistillConfig(temperature=TEMPERATURE, seed=s) for s in range(1, SAMPLES + 1)]
    for config in passes:
        config.max_tokens = tasks.max_new_tokens(spec)
        kept, why, _ = distill_rows(llm, rows, config, progress=True,
                                    check=lambda i, text: accepted(items[i], text))
        label = "greedy" if config.temperature == 0 else f"sampled_{config.seed}"
        counts[label] = why
        for row in kept:
            key = (row["messages"][-2]["content"], row["messages"][-1]["content"])
            if key in seen:
                counts[label]["repeated_answer"] = counts[label].get("repeated_answer", 0) + 1
                continue
            seen.add(key)
            i = row["distill"]["source_line"]
            out.append({"messages": row["messages"], "task": spec, "answer": items[i].reference,
                        "distill": row["distill"]})
    counts["rows"] = len(out)
    return out, counts


def make(run: Run) -> None:
    from flare.engine import EngineConfig
    from flare.engine.llm import LLM

    run.work.mkdir(parents=True, exist_ok=True)
    remove_temporaries(run.work, ".transfer.*.tmp-*")
    p = plan(run)
    start = time.perf_counter()
    llm = LLM.from_dir(run.seed, dtype=DTYPE, config=EngineConfig(max_num_seqs=MAX_NUM_SEQS))
    rows, per_task = [], {}
    for spec in p["tasks"]:
        began = time.perf_counter()
        kept, counts = distill_task(llm, run, spec, p["problems"], p["seed"])
        counts["seconds"] = round(time.perf_counter() - began, 1)
        rows += kept
        per_task[spec] = counts
        print(f"  {spec}: {counts['rows']} rows from {counts['distinct']} distinct problems "
              f"({counts['seconds']:.0f} s)", flush=True)
    if not rows:
        raise SystemExit(f"none of the seed's answers to {p['tasks']} was accepted: no transfer data")
    tmp = run.transfer.with_name(f".{run.transfer.name}.tmp-0")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(run.transfer)
    write_json(run.transfer.with_suffix(".json"), {
        "plan": p, "rows": len(rows), "tasks": per_task, "seconds": round(time.perf_counter() - start, 1)})
