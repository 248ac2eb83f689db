"""Stage ``speed``: tokens per second of the final checkpoint per mode, at batch 1 and 8 (1 with --quick), per dtype.

The same ``PROMPTS`` evaluation questions (taken in turn from each transfer task) in every cell, greedy, each
task's token budget; one engine with ``max_num_seqs`` = batch per cell, through ``flare.eval.evaluate`` (an
untimed warm-up per mode, then the timed run). Dtypes: float32, and bfloat16 where the CPU multiplies it
natively (``flare.device.native_bf16``: AMX or AVX-512-BF16, or CUDA). Speed-ups are against causal decoding in
the same cell, so they are ratios measured in one run. Writes ``speed.json``.

The cells are measured in a process of their own (``python -m recipes.smollm2 --stages speed``, started by this
stage): in the process that had just trained the model the same cells ran slower, and AR-Trust most (converted
SmolLM2, bf16, batch 1, AR-Trust paced / causal: 1.73x there against 1.87x in a fresh process for the 320-step
checkpoint, 1.63x against 1.97x for a 640-step one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from recipes.smollm2 import tasks, train
from recipes.smollm2.common import Run, read_json, write_json
# The default AR-Trust (paced: draft lengths or causal steps by the clock) and always drafting full rounds;
# Diffusion-Trust without and with look-ahead.
MODES = "causal,ar_trust,ar_trust:pause=0,diffusion_trust,diffusion_trust:lookahead=1"

PROMPTS, QUICK_PROMPTS = 16, 2
# --quick measures batch 1 only: with its two prompts a batch of 8 would hold two sequences, and the cells
# would repeat batch 1's modes at the recipe's test's cost (22 of its 125 s on 2 cores).
BATCHES, QUICK_BATCHES = (1, 8), (1,)


def dtypes() -> list[str]:
    from flare.device import native_bf16, pick_device

    return ["float32"] + (["bfloat16"] if native_bf16(pick_device()) else [])


def plan(run: Run) -> dict:
    have = train.checkpoints(run)
    return {"model": have[-1].name if have else None, "modes": MODES,
            "batches": list(QUICK_BATCHES if run.quick else BATCHES),
            "dtypes": dtypes(), "prompts": QUICK_PROMPTS if run.quick else PROMPTS,
            "tasks": tasks.chosen(run)["transfer"]}


def done(run: Run) -> bool:
    found = read_json(run.work / "speed.json")
    return train.done(run) and found is not None and found.get("plan") == plan(run)


CHILD = "FLARE_RECIPE_SPEED_CHILD"  # set in the process that measures


def make(run: Run) -> None:
    if os.environ.get(CHILD) != "1":
        command = [sys.executable, "-m", "recipes.smollm2", "--out", str(run.out.resolve()), "--stages", "speed",
                   *(["--quick"] if run.quick else [])]
        done = subprocess.run(command, env={**os.environ, CHILD: "1"}, cwd=Path(__file__).resolve().parents[2])
        if done.returncode != 0:
            raise SystemExit(f"the speed stage's process failed (exit {done.returncode})")
        return
    measure(run)


def measure(run: Run) -> None:
    import torch

    from flare.decoding import SamplingParams, parse_modes
    from flare.device import cpu_path, describe
    from flare.engine import EngineConfig
    from flare.engine.llm import LLM
    from flare.eval import Task, evaluate

    if not train.done(run):
        raise SystemExit(f"no trained checkpoints in {run.train}: run the train stage first")
    p = plan(run)
    per_task = [tasks.eval_task(run, spec).items for spec in p["tasks"]]
    items = [per_task[i % len(per_task)][i // len(per_task)] for i in range(p["prompts"])]
    budget = max(tasks.max_new_tokens(spec) for spec in p["tasks"])
    cells, start = [], time.perf_counter()
    for dtype in p["dtypes"]:
        for batch in p["batches"]:
            llm = LLM.from_dir(train.checkpoints(run)[-1], dtype=dtype, config=EngineConfig(max_num_seqs=batch))
            report = evaluate(llm, Task("speed", items), parse_modes(p["modes"]),
                              SamplingParams(temperature=0, max_new_tokens=budget), progress=False)
            causal = report.result("causal").tokens_per_s
            for r in report.results:
                cells.append({"dtype": dtype, "device": describe(llm.model.device, llm.model.dtype, llm.model),
                              "batch": batch, "mode": r.mode, "label": r.label,
                              "tokens_per_s": r.tokens_per_s, "tokens_per_forward": r.tokens_per_forward,
                              "speedup": r.tokens_per_s / causal if causal else None, "new_tokens": r.new_tokens,
                              "seconds": r.seconds, "same_as_causal": r.same_as_causal,
                              "acceptance": r.acceptance})
                print(f"  {dtype} batch {batch} {r.label}: {r.tokens_per_s:.1f} tok/s, "
                      f"{r.tokens_per_forward:.2f} tok/fwd, {cells[-1]['speedup']:.2f}x causal", flush=True)
    write_json(run.work / "speed.json", {
        "plan": p, "cpu_path": cpu_path(),
        "threads": torch.get_num_threads(), "max_new_tokens": budget, "cells": cells,
        "seconds": round(time.perf_counter() - start, 1)})
