"""Training checkpoints: HF safetensors weights + optimizer + RNG + sampler position, written atomically.

The weights file keeps the source checkpoint's dtype; an fp32 master that differs from it is saved beside the
optimizer state, and resuming loads that, not the rounded weights.

A checkpoint is a directory ``step-00000012`` holding a loadable model (config.json, safetensors, tokenizer) and
``trainer.pt`` (optimizer, sampler and RNG states: tensors and plain containers, loaded with weights_only).
It is written under a temporary name and renamed into place only when complete, so a crash while writing
leaves the previous checkpoint as the latest. State dicts are gathered in full (FSDP2 included), so a checkpoint
saved by N ranks loads in any number.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from flare.checkpoint import save_model
from flare.model import FlareModel
from flare.train.distributed import Dist, barrier

PREFIX = "step-"
TRAINER_FILE = "trainer.pt"
DONE_FILE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (an interrupted write has no DONE_FILE and no final name)."""
    found = [p for p in out_dir.glob(f"{PREFIX}*") if p.is_dir() and (p / DONE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def remove_partial(out_dir: Path) -> None:
    """Delete what interrupted writes left behind (never listed as checkpoints, but they take disk)."""
    for tmp in out_dir.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def save(out_dir: Path, step: int, model: FlareModel, optimizer: torch.optim.Optimizer, sampler_state: dict,
         d: Dist, tokenizer_from: str | Path, keep_last: int, metrics: dict | None = None,
         dtypes: dict[str, torch.dtype] | None = None) -> Path | None:
    """Write checkpoint ``step``. ``dtypes``: each tensor's dtype in the weights file (the source checkpoint's);
    when a trained parameter has another dtype (an fp32 master), the parameters also go into the resume state, so
    resuming is exact."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=full)
    optim = get_optimizer_state_dict(model, optimizer, options=full)
    final = out_dir / f"{PREFIX}{step:08d}"
    if d.main:
        tmp = out_dir / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        dtypes = dtypes or {}
        stored = {k: v.to(dtypes.get(k, v.dtype)) for k, v in weights.items()}
        save_model(model, tmp, tokenizer_from=tokenizer_from, state=stored)
        trainer = {"optimizer": optim, "sampler": sampler_state, "rng": rng_state(), "step": step}
        if any(stored[k].dtype != v.dtype for k, v in weights.items()):
            trainer["master"] = weights
        torch.save(trainer, tmp / TRAINER_FILE)
        (tmp / DONE_FILE).write_text(json.dumps({"step": step, "metrics": metrics or {}}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def load(path: Path, model: FlareModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from ``path``; returns the trainer state (step, sampler)."""
    from flare.checkpoint import load_model

    state = torch.load(path / TRAINER_FILE, weights_only=True, map_location="cpu")
    weights = state["master"] if "master" in state else load_model(path).state_dict()
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=full)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
    set_rng_state(state["rng"])
    return state

