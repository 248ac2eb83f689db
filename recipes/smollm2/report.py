"""Stage ``report``: ``report.md`` and ``conversion.png`` from the other stages' JSON files, nothing measured here.

Retention is the converted model's accuracy over the seed's on the same problems (``retention``); the trend
plot puts causal and Diffusion-Trust retention and the two parallel modes' tokens per forward against the
conversion tokens each checkpoint had seen (supervised answer tokens, from the trainer's ``metrics.jsonl``).
"""

from __future__ import annotations

import json

from recipes.smollm2 import evaluate, speed, train
from recipes.smollm2.common import Run, read_json

PARALLEL = ("ar_trust", "diffusion_trust", evaluate.LOOKAHEAD)


def retention(model: float, seed: float) -> float | None:
    return model / seed if seed else None


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def tokens_at(run: Run) -> dict[int, int]:
    """Step -> supervised tokens seen by the end of it."""
    seen, total = {}, 0
    for line in (run.train / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        total += int(m["tokens"])
        seen[int(m["step"])] = total
    return seen


def trend(run: Run, results: dict, transfer: list[str], k: int) -> list[dict]:
    """Per checkpoint: conversion tokens, and over the first ``k`` problems of each transfer task: causal and
    Diffusion-Trust retention against the seed on the same problems, tokens per forward of each parallel mode."""
    seen = tokens_at(run)
    seed = [s for t in transfer for s in results["seed"][t]["results"]["causal"]["scores"][:k]]
    points = []
    for name, rows in results.items():
        if name == "seed":
            continue
        step = int(name.split("-")[1])
        point = {"checkpoint": name, "step": step, "tokens": seen.get(step)}
        for mode in ("causal", *PARALLEL):
            if any(mode not in rows[t]["results"] for t in transfer):
                continue  # a run evaluated before that mode was
            ours = [rows[t]["results"][mode] for t in transfer]
            accuracy = sum(s for r in ours for s in r["scores"][:k]) / len(seed)
            point[f"{mode}_accuracy"] = accuracy
            point[f"{mode}_retention"] = retention(accuracy, sum(seed) / len(seed))
            point[f"{mode}_tokens_per_forward"] = sum(len(ids) for r in ours for ids in r["token_ids"][:k]) / max(
                1, sum(f for r in ours for f in r["forwards"][:k]))
        points.append(point)
    return sorted(points, key=lambda p: p["step"])


def per_problem_results(run: Run) -> dict:
    """``eval.json``'s results with the per-problem lists read back from ``eval/MODEL/TASK.json``."""
    from recipes.smollm2.survey import file_name

    summary = read_json(run.work / "eval.json")
    return {m: {t: read_json(run.work / "eval" / m / f"{file_name(t)}.json") for t in rows}
            for m, rows in summary["results"].items()}


def plot(points: list[dict], path) -> None:
    from flare.eval.plots import pyplot

    plt = pyplot()
    fig, left = plt.subplots(figsize=(6.4, 4))
    x = [p["tokens"] / 1e3 for p in points]
    for mode, style in (("causal", "o-"), ("diffusion_trust", "s-")):
        if all(p[f"{mode}_retention"] is not None for p in points):
            left.plot(x, [100 * p[f"{mode}_retention"] for p in points], style, label=f"{mode} retention")
    left.set_xlabel("conversion tokens (thousands of supervised answer tokens)")
    left.set_ylabel("retention of the seed's accuracy (%)")
    left.grid(alpha=0.3)
    right = left.twinx()
    for mode, style, color in (("ar_trust", "^--", "tab:red"), ("diffusion_trust", "v--", "tab:purple"),
                               (evaluate.LOOKAHEAD, "x:", "tab:brown")):
        if all(f"{mode}_tokens_per_forward" in p for p in points):
            right.plot(x, [p[f"{mode}_tokens_per_forward"] for p in points], style, color=color,
                       label=f"{mode} tokens/forward")
    right.set_ylabel("tokens per forward")
    lines = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    left.legend(lines, labels, loc="lower right", fontsize=8)
    left.set_title("SmolLM2-135M-Instruct: FLARE conversion on transfer tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_table(results: dict, final: str, kinds: dict[str, list[str]]) -> list[str]:
    lines = ["| task | kind | problems | seed causal | causal (retention) | AR-Trust (tok/fwd, acceptance, "
             "= causal) | Diffusion-Trust (retention, tok/fwd) | Diffusion-Trust, look-ahead (retention, "
             "tok/fwd) |", "|---|---|---|---|---|---|---|---|"]

    def block(d: dict | None, seed: float) -> str:
        if d is None:
            return "-"
        return f"{pct(d['accuracy'])} ({pct(retention(d['accuracy'], seed))}, {d['tokens_per_forward']:.2f})"

    for kind, specs in kinds.items():
        for spec in specs:
            seed = results["seed"][spec]["results"]["causal"]["accuracy"]
            r = results[final][spec]["results"]
            c, a = r["causal"], r["ar_trust"]
            lines.append(
                f"| {spec} | {kind} | {results[final][spec]['problems']} | {pct(seed)} | {pct(c['accuracy'])} "
                f"({pct(retention(c['accuracy'], seed))}) | {pct(a['accuracy'])} ({a['tokens_per_forward']:.2f}, "
                f"{pct(a['acceptance'])}, {pct(a['same_as_causal'])}) | {block(r['diffusion_trust'], seed)} | "
                f"{block(r.get(evaluate.LOOKAHEAD), seed)} |")
    return lines


def independent_table(results: dict, final: str) -> list[str]:
    lines = ["| task | identical to the seed | mean identical prefix / seed tokens | seed-answer NLL: converted / "
             "seed |", "|---|---|---|---|"]
    for spec, row in results[final].items():
        g, n = row["agreement"], row["nll"]
        lines.append(f"| {spec} | {pct(g['identical'])} | {g['mean_identical_prefix']:.1f} / "
                     f"{g['mean_seed_tokens']:.1f} | {n['converted']:.3f} / {n['seed']:.3f} |")
    return lines


def speed_table(found: dict) -> list[str]:
    lines = ["| dtype | batch | mode | tokens/s | speed-up vs causal | tokens/forward | = causal |",
             "|---|---|---|---|---|---|---|"]
    for c in found["cells"]:
        lines.append(f"| {c['dtype']} | {c['batch']} | {c['label']} | {c['tokens_per_s']:.1f} | "
                     f"{c['speedup']:.2f}x | {c['tokens_per_forward']:.2f} | {pct(c['same_as_causal'])} |")
    return lines


def lookahead_cell(point: dict) -> str:
    key = evaluate.LOOKAHEAD
    if f"{key}_tokens_per_forward" not in point:
        return "-"
    return f"{pct(point.get(f'{key}_retention'))}, {point[f'{key}_tokens_per_forward']:.2f}"


def done(run: Run) -> bool:
    return (run.work / "report.md").is_file() and evaluate.done(run) and speed.done(run) and \
        (run.work / "report.md").stat().st_mtime >= max((run.work / f).stat().st_mtime for f in
                                                          ("eval.json", "speed.json"))


def make(run: Run) -> None:
    if not (evaluate.done(run) and speed.done(run)):
        raise SystemExit("the report needs the evaluate and speed stages first")
    results = per_problem_results(run)
    plan = read_json(run.work / "eval.json")["plan"]
    kinds = plan["tasks"]
    final = list(results)[-1]
    points = trend(run, results, kinds["transfer"], plan["trend_problems"])
    plot(points, run.work / "conversion.png")
    transfer = read_json(run.transfer.with_suffix(".json"))
    scores = read_json(run.work / "transfer.scores.json") or {}
    cfg = train.config(run)
    found = read_json(run.work / "speed.json")
    stages = read_json(run.work / "stages.json") or {}
    if "survey" not in stages and (surveyed := read_json(run.survey.with_suffix(".json"))):
        stages["survey"] = surveyed["seconds"]  # a survey run on its own, before the other stages
    stages["total"] = round(sum(stages.values()), 1)
    text = [
        "# SmolLM2-135M-Instruct through FLARE: the recipe's report", "",
        f"Stage wall times (s): {json.dumps(stages)}", "",
        "## Transfer data", "",
        f"{transfer['rows']} rows ({json.dumps(transfer['tasks'])}); seed NLL of the rows: "
        f"mean {scores.get('mean_nll', float('nan')):.3f} over {scores.get('tokens', 0)} tokens.", "",
        "## Conversion training", "",
        f"FLARE objective, block size {cfg.objective.block_size}, {cfg.steps} steps x {cfg.batch_size} rows x "
        f"{cfg.data.seq_len} tokens, AdamW lr {cfg.optim.lr} ({cfg.optim.schedule}, {cfg.optim.warmup_steps} "
        f"warm-up), bf16 autocast: {cfg.bf16}; {tokens_at(run).get(cfg.steps, 0)} supervised tokens.", "",
        "## Accuracy per mode (final checkpoint, float32, greedy)", "", *accuracy_table(results, final, kinds), "",
        "## Agreement with the seed and the seed's answers' NLL (final checkpoint)", "",
        *independent_table(results, final), "",
        "## Trend along conversion (transfer tasks, first problems of each)", "",
        "| checkpoint | tokens | causal retention | Diffusion-Trust retention | AR-Trust tok/fwd | "
        "Diffusion-Trust tok/fwd | look-ahead retention, tok/fwd |", "|---|---|---|---|---|---|---|",
        *[f"| {p['checkpoint']} | {p['tokens']} | {pct(p.get('causal_retention'))} | "
          f"{pct(p.get('diffusion_trust_retention'))} | {p['ar_trust_tokens_per_forward']:.2f} | "
          f"{p['diffusion_trust_tokens_per_forward']:.2f} | {lookahead_cell(p)} |" for p in points], "",
        "![retention and tokens per forward against conversion tokens](conversion.png)", "",
        f"## Speed (final checkpoint, {found['cpu_path']}, {found['threads']} threads, "
        f"{found['plan']['prompts']} prompts, up to {found['max_new_tokens']} new tokens)", "",
        *speed_table(found), ""]
    tmp = run.work / ".report.md.tmp-0"
    tmp.write_text("\n".join(text))
    tmp.replace(run.work / "report.md")
    print("\n".join(text))
