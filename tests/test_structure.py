"""The one-way import rule of docs/architecture.md: ops -> model -> {objective, decoding} -> {train, engine} ->
{serve, eval, transfer} -> {demo, cli}. Every module of the package is checked, top-level ones included, and
``from flare import X`` counts as importing what X is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "flare"
# Leaves: anything may import them (ops imports none of the others).
# block_mask builds masks' BlockMasks from masks, which never imports it.
LEAVES = {"config", "masks", "block_mask", "ops", "device", "heap"}
_SERVING = {"engine", "decoding", "model", "data", "checkpoint"}
# Each top-level package or module may import only the ones listed for it (plus itself and the leaves).
ALLOWED = {
    "ops": set(),
    "config": set(),
    "masks": set(),
    "block_mask": set(),
    "device": set(),
    "heap": set(),
    "cliargs": set(),
    "model": set(),
    "checkpoint": {"model"},
    "decoding": {"model"},  # a strategy never schedules itself: decoding never imports engine
    "data": set(),
    "objective": {"model", "data"},
    "engine": {"model", "decoding", "checkpoint", "data"},
    "serve": _SERVING,
    "eval": _SERVING,
    "transfer": _SERVING | {"eval", "cliargs"},
    "train": {"model", "data", "objective", "checkpoint"},
    # Test support sits above everything it builds checkpoints and data with.
    "testing": {"data", "train", "model", "checkpoint", "objective"},
    "demo": {"data", "decoding", "engine", "eval", "model", "objective", "train", "checkpoint"},
    "cli": {"cliargs", "decoding", "engine", "eval", "serve", "train", "transfer", "demo", "checkpoint"},
    "__init__": {"checkpoint"},
    "__main__": {"cli"},
}
PACKAGES = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
            if (p.suffix == ".py" or (p / "__init__.py").exists())}


def _package(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The top-level flare packages or modules ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "flare":
            for alias in node.names:
                # `from flare import X`: X's own module, or what the package root imports to provide it.
                found |= {alias.name} if alias.name in PACKAGES else {"__init__"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flare."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("flare."))
            if any(a.name == "flare" for a in node.names):
                found.add("__init__")
    return found


def _closure(pkg: str) -> set[str]:
    """What a package may reach: its allowed imports, and through __init__ what the package root imports."""
    allowed = ALLOWED[pkg] | {pkg} | (LEAVES if pkg != "ops" else {"ops"})
    return allowed | ({"__init__"} if ALLOWED["__init__"] <= allowed | LEAVES else set())


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path):
    pkg = _package(path)
    assert pkg in ALLOWED, f"flare/{pkg} has no place in the layering: add it to ALLOWED and docs/architecture.md"
    bad = _imports(path) - _closure(pkg)
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)} against the layering"


def test_the_rule_sees_every_form_of_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import flare\nfrom flare import engine\nfrom flare import load_model\n"
                     "import flare.serve.app\nfrom flare.eval.harness import evaluate\n")
    assert _imports(probe) == {"__init__", "engine", "serve", "eval"}
    assert "__init__" not in _closure("decoding")  # the root imports checkpoint, which decoding may not


def test_files_stay_small():
    big = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if len(p.read_text().splitlines()) > 350]
    assert not big, f"split these files by role: {big}"
