"""`flare demo --quick` end to end: train, convert, evaluate every mode, write the report and plots."""

from __future__ import annotations

import json

from flare.demo import QUICK, run


def test_quick_demo_writes_a_complete_report(tmp_path):
    results = run(tmp_path, QUICK)
    report = (tmp_path / "report.md").read_text()
    for mode in ("causal", "ar_trust", "ar_trust:redraft=last", "diffusion_trust", "low_confidence:block_size=3"):
        assert f"| {mode} |" in report, mode
    assert results["ar_trust_equals_causal"]  # AR-Trust at temperature 0 == causal, token for token
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {r["mode"] for r in saved["eval"]["results"]} == {"causal", "ar_trust", "diffusion_trust",
                                                             "low_confidence"}
    assert all(r["valid"] for r in saved["throughput"])
    for png in ("throughput.png", "accuracy_vs_tpf.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # A second run reuses the trained checkpoints (only evaluates).
    assert run(tmp_path, QUICK)["checkpoint"] == results["checkpoint"]
