"""Helpers of the training tests: configs on disk, `flare train` subprocesses, metrics and weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
# Runs are bit-reproducible only with a fixed intra-op thread count (CPU reductions split by thread).
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def env() -> dict[str, str]:
    e = dict(os.environ, **THREADS)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH", "")]))
    return e


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cmd(config: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "flare", "train", "--config", str(config)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def metrics(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir: Path) -> list[float]:
    rows = metrics(out_dir)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "metrics.jsonl must hold steps 1..n once each"
    return [r["loss"] for r in rows]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint) / "model.safetensors"))


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"step-{step:08d}"
