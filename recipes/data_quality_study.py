"""Does transfer-data quality decide what survives conversion? A small-scale, reproducible study (method §5).

One tiny hybrid AR source (the demo's architecture, trained on 2-digit additions in the column-arithmetic
style) is converted with the FLARE objective under a fixed budget, with four arms of transfer data:

  a. self_distilled  the source's own greedy answers to new problems, kept only when correct
  b. original        new problems written in the source's training style (same distribution)
  c. off_dist        the same problems answered in another style (place values, the sum in words, \\boxed{})
  d. block_diffusion the pure block-diffusion objective (no AR loss, block-causal clean stream) on the data of
                     the best of a-c

Every converted model is evaluated greedily on held-out problems in causal, AR-Trust and Diffusion-Trust
modes; retention = accuracy / the source's causal accuracy. Each data set's seed-model NLL (``flare data
score``) is reported beside it. Each arm is trained with several seeds; the table gives mean +- spread (half
the range).

    python -m recipes.data_quality_study --out runs/dq-study [--seeds 3] [--docs docs]   # ~30-60 min, 2 cores
    python -m recipes.data_quality_study --out /tmp/dq --quick                          # ~1 min smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from flare.data.arithmetic import generate_rows
from flare.data.jsonl import read_jsonl, write_jsonl
from flare.decoding import SamplingParams, parse_modes
from flare.demo import Budget, source_init, train_data, train_stage
from flare.engine import EngineConfig
from flare.engine.llm import LLM
from flare.eval import evaluate, load_task
from flare.objective import ObjectiveConfig
from flare.train.convert import convert
from flare.transfer.distill import DistillConfig, distill_rows
from flare.transfer.score import score_rows, summarize

MODES = parse_modes("causal,ar_trust,diffusion_trust")
ARMS = ("self_distilled", "original", "off_dist")


@dataclass
class StudyBudget:
    # The source is the demo's (same data, initialisation and AR budget), so a demo run's cache can be reused.
    source: Budget = field(default_factory=Budget)
    transfer_rows: int = 1500
    flare_steps: int = 150
    heldout: int = 100
    seeds: int = 3


QUICK = StudyBudget(source=Budget(train_rows=200, ar_steps=20, ar_seq_len=96), transfer_rows=48, flare_steps=6,
                    heldout=6, seeds=1)


def build_data(out: Path, source: Path, s: StudyBudget) -> dict[str, Path]:
    """The three transfer sets over the same new problems (seed 7, apart from the source's and held-out)."""
    paths = {arm: out / f"{arm}.jsonl" for arm in ARMS}
    if all(p.exists() for p in paths.values()):
        return paths
    original = generate_rows(s.transfer_rows, seed=7, max_digits=2)
    write_jsonl(original, paths["original"])
    write_jsonl(generate_rows(s.transfer_rows, seed=7, max_digits=2, style="offdist"), paths["off_dist"])
    llm = LLM.from_dir(source, config=EngineConfig(max_num_seqs=32))
    rows, counts, _ = distill_rows(llm, list(enumerate(original, start=1)),
                                   DistillConfig(max_tokens=96, verify="strict"))
    print(f"self-distilled: {counts}", flush=True)
    write_jsonl(rows, paths["self_distilled"])
    return paths


def seed_nll(source: Path, path: Path) -> dict:
    llm = LLM.from_dir(source)
    return summarize(score_rows(llm.model, llm.tokenizer, list(read_jsonl(path)), progress=False))


def run_arm(out: Path, source: Path, data: Path, objective: ObjectiveConfig, s: StudyBudget, seed: int,
            task) -> dict[str, float]:
    converted = out / "converted"
    if not (converted / "config.json").exists():
        convert(source, converted)
    b = s.source
    final = train_stage(converted, out / f"seed-{seed}", objective, s.flare_steps, b.flare_lr, data,
                        b.flare_seq_len, b.batch_size, seed=seed, progress=False)
    report = evaluate(LLM.from_dir(final, config=EngineConfig(max_num_seqs=32)), task, MODES,
                      SamplingParams(temperature=0, max_new_tokens=96), progress=False)
    return {r.mode: r.accuracy for r in report.results} | {
        "ar_trust_tpf": report.result("ar_trust").tokens_per_forward,
        "diffusion_trust_tpf": report.result("diffusion_trust").tokens_per_forward}


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (max(values) - min(values)) / 2


def run(out: Path, s: StudyBudget) -> dict:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    b = s.source
    cache = out / "source"
    cache.mkdir(exist_ok=True)
    print(f"source: {b.ar_steps} AR steps", flush=True)
    source = train_stage(source_init(cache, 0), cache / "ar", "ar", b.ar_steps, b.ar_lr, train_data(cache, b, 0),
                         b.ar_seq_len, b.batch_size)
    task = load_task("arithmetic:2", limit=s.heldout)
    src_report = evaluate(LLM.from_dir(source, config=EngineConfig(max_num_seqs=32)), task, parse_modes("causal"),
                          SamplingParams(temperature=0, max_new_tokens=96), progress=False)
    source_acc = src_report.results[0].accuracy
    print(f"source causal accuracy {source_acc:.3f}", flush=True)
    data = build_data(out, source, s)
    nll = {arm: seed_nll(source, path) for arm, path in data.items()}

    results: dict[str, list[dict]] = {}
    for arm in ARMS:
        results[arm] = []
        for seed in range(s.seeds):
            print(f"arm {arm}, seed {seed}", flush=True)
            results[arm].append(run_arm(out / arm, source, data[arm], ObjectiveConfig(kind="flare"), s, seed, task))
    best = max(ARMS, key=lambda arm: statistics.mean(r["causal"] for r in results[arm]))
    results["block_diffusion"] = []
    for seed in range(s.seeds):
        print(f"arm block_diffusion ({best} data), seed {seed}", flush=True)
        results["block_diffusion"].append(run_arm(out / "block_diffusion", source, data[best],
                                                  ObjectiveConfig(kind="block_diffusion"), s, seed, task))
    nll["block_diffusion"] = nll[best]
    summary = {
        "budget": asdict(s), "source_accuracy": source_acc, "best_data": best, "seed_nll": nll, "runs": results,
        "seconds": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def table(summary: dict) -> str:
    # Retention needs a source that solves something; otherwise (a smoke run) the table shows accuracies.
    src = summary["source_accuracy"] or 1.0
    what = "retention" if summary["source_accuracy"] else "accuracy"
    lines = [f"| arm | data seed-NLL | causal {what} | AR-Trust {what} | Diffusion-Trust {what} | "
             "AR-Trust TPF |", "|---|---|---|---|---|---|"]
    for arm, runs in summary["runs"].items():
        cells = []
        for mode in ("causal", "ar_trust", "diffusion_trust"):
            m, sp = _mean_spread([r[mode] / src for r in runs])
            cells.append(f"{100 * m:.0f}% ± {100 * sp:.0f}")
        tpf, tsp = _mean_spread([r["ar_trust_tpf"] for r in runs])
        name = f"{arm} ({summary['best_data']} data)" if arm == "block_diffusion" else arm
        lines.append(f"| {name} | {summary['seed_nll'][arm]['mean_nll']:.3f} | " + " | ".join(cells)
                     + f" | {tpf:.2f} ± {tsp:.2f} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    from flare.eval.plots import pyplot

    plt = pyplot()
    src = summary["source_accuracy"] or 1.0
    arms = list(summary["runs"])
    modes = ("causal", "ar_trust", "diffusion_trust")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        stats = [_mean_spread([r[mode] / src for r in summary["runs"][arm]]) for arm in arms]
        ax.bar([a + (i - 1) * width for a in range(len(arms))], [100 * m for m, _ in stats], width,
               yerr=[100 * sp for _, sp in stats], capsize=3, label=mode)
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("accuracy retained vs source (%)")
    ax.set_title(f"Retention after conversion ({summary['budget']['flare_steps']} FLARE steps, "
                 f"{summary['budget']['seeds']} seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/dq-study", help="working directory (stages are reused when present)")
    ap.add_argument("--quick", action="store_true", help="a ~1-minute smoke run")
    ap.add_argument("--seeds", type=int, help="training seeds per arm (default 3)")
    ap.add_argument("--flare-steps", type=int, help="conversion steps per run (default 200)")
    ap.add_argument("--docs", help="also write DOCS/data_quality_study.{json,png} and print the table there")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else StudyBudget()
    if args.seeds:
        s = replace(s, seeds=args.seeds)
    if args.flare_steps:
        s = replace(s, flare_steps=args.flare_steps)
    summary = run(Path(args.out), s)
    plot(summary, Path(args.out) / "retention.png")
    text = table(summary)
    print(f"\nsource causal accuracy: {100 * summary['source_accuracy']:.1f}%\n{text}\n"
          f"({summary['seconds']:.0f} s)")
    if args.docs:
        docs = Path(args.docs)
        (docs / "data_quality_study.json").write_text(json.dumps(summary, indent=2))
        plot(summary, docs / "data_quality_study.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
