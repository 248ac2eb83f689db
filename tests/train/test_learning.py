"""The toy recipe at smoke size learns, and the activation-checkpointing and bf16 switches work."""

from __future__ import annotations

import math

import pytest
import torch

import flare.model.hybrid as hybrid
from flare.train.config import TrainConfig, from_dict
from flare.train.loop import Trainer, _row_seed


def test_toy_flare_objective_learns(make_config):
    cfg = from_dict(TrainConfig, make_config(steps=24, save_every=1000, optim={"lr": 0.006, "warmup_steps": 3}))
    history = Trainer(cfg).run()
    loss = [m["loss"] for m in history]
    assert len(loss) == 24 and all(math.isfinite(x) for x in loss)
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < 0.7 * first, (first, last, loss)
    # Both terms of the objective go down, not just one.
    for key in ("loss_diff", "loss_ar"):
        part = [m[key] for m in history]
        assert sum(part[-5:]) < 0.8 * sum(part[:5]), (key, part)


def _loss_and_grads(trainer: Trainer, batch, views, checkpointing: bool):
    model = trainer.model
    model.gradient_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    loss = trainer.objective.parts(model, batch, views).loss()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_loss_and_gradients(make_config, monkeypatch):
    calls = []
    real = hybrid.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hybrid, "checkpoint", counting)
    trainer = Trainer(from_dict(TrainConfig, make_config(steps=1)))
    batch = next(trainer.sampler)
    views = trainer.objective.views(batch, row_seeds=[_row_seed(0, 0, i) for i in range(len(batch.input_ids))])
    loss0, grads0 = _loss_and_grads(trainer, batch, views, False)
    assert not calls
    loss1, grads1 = _loss_and_grads(trainer, batch, views, True)
    assert len(calls) == trainer.model.config.num_hidden_layers  # every layer recomputed
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for key in grads0:
        torch.testing.assert_close(grads1[key], grads0[key], rtol=1e-5, atol=1e-7, msg=key)


def test_activation_checkpointing_flag_in_a_training_step(make_config, tmp_path, monkeypatch):
    calls = []
    real = hybrid.checkpoint
    monkeypatch.setattr(hybrid, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = Trainer(from_dict(TrainConfig, make_config(tmp_path / "plain", steps=1))).run()
    assert not calls
    cfg = from_dict(TrainConfig, make_config(tmp_path / "ac", steps=1, activation_checkpointing=True))
    recomputed = Trainer(cfg).run()
    assert calls
    for key in ("loss", "loss_diff", "loss_ar", "grad_norm"):
        assert recomputed[0][key] == pytest.approx(plain[0][key], rel=1e-6), key


def test_bf16_flag_runs_a_step(make_config, tmp_path):
    plain = Trainer(from_dict(TrainConfig, make_config(tmp_path / "fp32", steps=1))).run()[0]
    bf16 = Trainer(from_dict(TrainConfig, make_config(tmp_path / "bf16", steps=1, bf16=True))).run()[0]
    assert math.isfinite(bf16["loss"]) and math.isfinite(bf16["grad_norm"])
    # Autocast is really on (bf16 matmuls round differently) and still close to fp32.
    assert bf16["loss"] != plain["loss"]
    assert bf16["loss"] == pytest.approx(plain["loss"], rel=2e-2)
    assert bf16["grad_norm"] == pytest.approx(plain["grad_norm"], rel=0.1)
