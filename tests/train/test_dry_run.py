"""`flare train --dry-run`: a training step replayed on fake tensors, so the memory is known before anything is
allocated; the replay's accounting equals the same step run for real."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import flare.train.memory as memory
from flare.config import ModelConfig
from flare.model import FlareModel
from flare.train.config import TrainConfig, from_dict
from tests.train._util import REPO, env, write_config


def _params(config: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in FlareModel(config).parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_fake_replay_accounts_like_the_real_step(make_config, checkpointing):
    cfg = from_dict(TrainConfig, make_config(steps=1, bf16=True))
    config = ModelConfig.from_file(cfg.model)
    fake = memory._replay(cfg, config, torch.float32, checkpointing)
    real = memory._replay(cfg, config, torch.float32, checkpointing, fake=False)
    # The same tensors at the peak (up to a few small allocations the real kernels make and fake ones do not).
    assert fake[1:] == real[1:] and fake[0] == pytest.approx(real[0], rel=1e-3)
    total, params, optimizer, _ = fake
    n = _params(config)
    assert params == 4 * n  # fp32 masters
    assert 8 * n <= optimizer <= 8 * n + 64 * len(list(FlareModel(config).parameters()))  # two moments + steps
    assert total > params + optimizer


def test_checkpointing_lowers_the_estimated_peak(make_config):
    cfg = from_dict(TrainConfig, make_config(steps=1, activation_checkpointing=True,
                                             data={"train": [], "seq_len": 192}))
    est = memory.estimate(cfg)
    assert est.checkpointing and est.without_checkpointing > est.activations
    assert est.peak == est.parameters + est.gradients + est.optimizer + est.activations + est.context + est.runtime


def test_cli_dry_run_allocates_no_model_and_reads_no_data(toy, tmp_path):
    cfg = {"model": str(toy.flare), "out_dir": str(tmp_path / "out"), "steps": 100, "batch_size": 2,
           "data": {"train": [{"path": str(tmp_path / "missing.jsonl")}], "seq_len": 96}, "bf16": True}
    proc = subprocess.run([sys.executable, "-m", "flare", "train", "--config", str(write_config(tmp_path / "c.yaml", cfg)),
                           "--dry-run"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for line in ("parameters", "gradients", "optimizer state", "one logits chunk", "peak", "tokens: 96 per row"):
        assert line in out, out
    assert "19,200 over 100 steps" in out  # 2 rows x 96 tokens x 100 steps
    assert not (tmp_path / "out").exists()  # nothing written either


def test_a_deep_model_is_extrapolated_from_two_periods_of_layers(make_config, tmp_path):
    from flare.testing.checkpoints import save_random_hybrid

    model = save_random_hybrid(tmp_path / "deep", dtype=torch.float32, mask_token_id=95, vocab_size=96,
                               hidden_size=64, intermediate_size=128, num_hidden_layers=6, full_attention_interval=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=32, linear_num_key_heads=2,
                               linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)
    cfg = from_dict(TrainConfig, {**make_config(steps=1), "model": str(model)})
    config = ModelConfig.from_file(model)
    direct = memory._replay(cfg, config, torch.float32, True)
    extrapolated = memory._replay_layers(cfg, config, torch.float32, True)
    assert extrapolated[1:] == direct[1:]  # parameters, optimizer state, context: exact
    assert extrapolated[0] == pytest.approx(direct[0], rel=0.02)
