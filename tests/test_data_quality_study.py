"""The data-quality study's --quick variant end to end: every arm trained, scored and evaluated."""

from __future__ import annotations

import json

from recipes.data_quality_study import QUICK, main


def test_quick_study_runs_every_arm(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    assert main(["--out", str(tmp_path / "run"), "--quick", "--docs", str(docs)]) == 0
    summary = json.loads((docs / "data_quality_study.json").read_text())
    assert set(summary["runs"]) == {"self_distilled", "original", "off_dist", "block_diffusion"}
    assert all(len(runs) == QUICK.seeds for runs in summary["runs"].values())
    assert all({"causal", "ar_trust", "diffusion_trust"} <= set(r) for runs in summary["runs"].values()
               for r in runs)
    # The off-distribution answers are a different style: the seed finds them less likely than its own style.
    assert summary["seed_nll"]["off_dist"]["mean_nll"] > summary["seed_nll"]["original"]["mean_nll"]
    assert (docs / "data_quality_study.png").read_bytes()[:4] == b"\x89PNG"
    assert "| off_dist |" in capsys.readouterr().out
