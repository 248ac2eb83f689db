"""Tensors are made where they are used: a factory call inside a function that has a device at hand names it.

On a GPU a tensor made on the CPU beside CUDA tensors is an error at best (a generator or index on the wrong
device) and a hidden host-to-device copy at worst. The rule is checked by reading the source: every
``torch.zeros/ones/full/empty/arange/rand/randn/randint/tensor`` call in a function that mentions a device
(``device`` or ``.device``) passes ``device=``, or says on its line why it stays on the host (``# host: ...``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "flare"
FACTORIES = {"zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint", "tensor"}


def _mentions_device(fn: ast.AST) -> bool:
    return any((isinstance(n, ast.Name) and n.id in ("device", "dev")) or
               (isinstance(n, ast.Attribute) and n.attr == "device") or
               (isinstance(n, ast.arg) and n.arg in ("device", "dev")) for n in ast.walk(fn))


def offenders(path: Path) -> list[str]:
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or not _mentions_device(fn):
            continue
        for call in ast.walk(fn):
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in FACTORIES
                    and isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"
                    and not any(k.arg == "device" for k in call.keywords)
                    and "# host:" not in lines[call.lineno - 1]):
                found.append(f"{path.relative_to(ROOT.parent)}:{call.lineno}: torch.{call.func.attr}")
    return sorted(set(found))


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_factories_name_the_device_at_hand(path):
    bad = offenders(path)
    assert not bad, "pass device= (or mark '# host: why'): " + ", ".join(bad)


def test_the_scan_finds_a_factory_without_its_device(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\n"
                     "def f(x):\n    return torch.rand(3, generator=None) + x.to(x.device)\n"
                     "def g(x):\n    return torch.zeros(3)\n"
                     "def h(x):\n    return torch.rand(3, device=x.device)\n")
    probe = probe.rename(ROOT.parent / "tests" / "_probe_devices.py")
    try:
        assert offenders(probe) == ["tests/_probe_devices.py:3: torch.rand"]
    finally:
        probe.unlink()
