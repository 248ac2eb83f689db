"""``python -m recipes.smollm2``: the stages in order, each skipped when its output is complete."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import recipes.smollm2
from recipes.smollm2 import seed, survey
from recipes.smollm2.common import Run


@dataclass(frozen=True)
class Stage:
    name: str
    done: Callable[[Run], bool]  # its output is complete
    make: Callable[[Run], None]  # writes it


# In order. Later stages (distill, score, convert-train, evaluate, speed, report) join this list.
STAGES = [Stage("import", seed.done, seed.make), Stage("survey", survey.done, survey.make)]


def parser() -> argparse.ArgumentParser:
    names = [s.name for s in STAGES]
    ap = argparse.ArgumentParser(
        prog="python -m recipes.smollm2", description=recipes.smollm2.__doc__.split("\n\n")[0],
        epilog=f"stages, in order: {', '.join(names)}. A stage whose output is complete is skipped; a killed "
               "run resumes where it stopped.")
    ap.add_argument("--out", default="runs/smollm2", help="working directory (default runs/smollm2)")
    ap.add_argument("--quick", action="store_true",
                    help=f"survey {len(survey.QUICK_TASKS)} tasks x {survey.QUICK_PROBLEMS} problems (seconds) "
                         f"into OUT/survey-quick.json instead of {len(survey.TASKS)} x {survey.PROBLEMS} "
                         "(~10 min on 2 cores) into OUT/survey.json")
    ap.add_argument("--stages", default=",".join(names),
                    help=f"comma-separated subset of: {','.join(names)} (default: all)")
    ap.add_argument("--gguf", type=Path, help=f"import this GGUF file instead of the {seed.PACKAGE} package's")
    return ap


def main(argv: list[str] | None = None) -> int:
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
        print(f"[{stage.name}] finished in {time.perf_counter() - began:.1f} s", flush=True)
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0
