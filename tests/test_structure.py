"""The one-way import rule of docs/architecture.md: ops -> model -> {objective, decoding} -> ... -> cli."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "flare"
# Each package may import only from the packages listed for it (plus itself and the leaves).
LEAVES = {"config", "masks", "ops", "cliargs"}
ALLOWED = {
    "ops": set(),
    "config": set(),
    "masks": set(),
    "model": {"ops", "config", "masks"},
    "checkpoint": {"model", "ops", "config"},
    "decoding": {"model", "ops", "config", "masks"},
    "data": {"config", "tokenizer"},
    "objective": {"model", "ops", "config", "masks", "data"},
    "engine": {"model", "ops", "config", "masks", "decoding", "tokenizer", "checkpoint", "data"},
    "serve": {"engine", "decoding", "model", "config", "tokenizer", "data", "checkpoint", "ops"},
    "eval": {"engine", "decoding", "model", "config", "tokenizer", "data", "checkpoint", "ops"},
    "transfer": {"engine", "decoding", "model", "config", "tokenizer", "data", "checkpoint", "ops", "eval"},
    "train": {"model", "ops", "config", "masks", "data", "objective", "checkpoint", "tokenizer"},
    # Test support sits above everything it builds checkpoints and data with.
    "testing": {"config", "data", "train", "model", "checkpoint", "objective"},
}


def _package(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flare."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("flare."))
    return found


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path):
    pkg = _package(path)
    if pkg not in ALLOWED:
        return
    bad = _imports(path) - ALLOWED[pkg] - {pkg} - (LEAVES - {"cliargs"} if pkg != "ops" else set())
    if pkg == "ops":
        bad -= {"ops"}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)} against the layering"


def test_files_stay_small():
    big = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if len(p.read_text().splitlines()) > 350]
    assert not big, f"split these files by role: {big}"
