"""``python -m recipes.smollm2``: the stages in order, each skipped when its output is complete."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import recipes.smollm2
from recipes.smollm2 import distill, evaluate, report, score, seed, speed, survey, train
from recipes.smollm2.common import Run, read_json, write_json


@dataclass(frozen=True)
class Stage:
    name: str
    done: Callable[[Run], bool]  # its output is complete
    make: Callable[[Run], None]  # writes it


# In order.
STAGES = [Stage("import", seed.done, seed.make), Stage("survey", survey.done, survey.make),
          Stage("distill", distill.done, distill.make), Stage("score", score.done, score.make),
          Stage("train", train.done, train.make), Stage("evaluate", evaluate.done, evaluate.make),
          Stage("speed", speed.done, speed.make), Stage("report", report.done, report.make)]


def parser() -> argparse.ArgumentParser:
    names = [s.name for s in STAGES]
    ap = argparse.ArgumentParser(
        prog="python -m recipes.smollm2", description=recipes.smollm2.__doc__.split("\n\n")[0],
        epilog=f"stages, in order: {', '.join(names)}. A stage whose output is complete is skipped; a killed "
               "run resumes where it stopped.")
    ap.add_argument("--out", default="runs/smollm2", help="working directory (default runs/smollm2)")
    ap.add_argument("--quick", action="store_true",
                    help=f"every stage at a few problems and {train.QUICK_STEPS} training steps (minutes), into "
                         "OUT/survey-quick.json and OUT/quick/ (the seed is shared with the full run)")
    ap.add_argument("--stages", default=",".join(names),
                    help=f"comma-separated subset of: {','.join(names)} (default: all)")
    ap.add_argument("--gguf", type=Path, help=f"import this GGUF file instead of the {seed.PACKAGE} package's")
    return ap


def main(argv: list[str] | None = None) -> int:
    from flare.device import prepare_process

    prepare_process()  # first, before torch starts its intra-op threads (flare.device)
    ap = parser()
    args = ap.parse_args(argv)
    names = [s.name for s in STAGES]
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := sorted(set(wanted) - set(names)):
        ap.error(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(names)}")
    run = Run(Path(args.out), quick=args.quick, gguf=args.gguf)
    start = time.perf_counter()
    for stage in STAGES:
        if stage.name not in wanted:
            continue
        if stage.done(run):
            print(f"[{stage.name}] done already: skipped", flush=True)
            continue
        print(f"[{stage.name}] running", flush=True)
        began = time.perf_counter()
        stage.make(run)
        seconds = round(time.perf_counter() - began, 1)
        print(f"[{stage.name}] finished in {seconds:.1f} s", flush=True)
        run.work.mkdir(parents=True, exist_ok=True)
        write_json(run.work / "stages.json", {**(read_json(run.work / "stages.json") or {}), stage.name: seconds})
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0
