"""Fixtures of the training tests: the toy AR/FLARE checkpoints and arithmetic data, built once per session, and
one straight 8-step `flare train` run that the resume and torchrun tests compare against."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from flare.testing.toy import toy_ar_checkpoint, toy_data, toy_flare_checkpoint, toy_train_config
from tests.train._util import losses, run, train_cmd, write_config

STRAIGHT_STEPS = 8


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    ar = toy_ar_checkpoint(root / "ar", seed=0)
    flare_dir = toy_flare_checkpoint(root / "flare", ar_dir=ar)
    data = toy_data(root / "train.jsonl", 200, seed=0)
    return SimpleNamespace(root=root, ar=ar, flare=flare_dir, data=data)


@pytest.fixture
def make_config(toy, tmp_path):
    """A TrainConfig dict for the toy FLARE checkpoint, writing to tmp_path/out unless told otherwise."""

    def make(out_dir: Path | None = None, **overrides):
        return toy_train_config(toy.flare, toy.data, out_dir or tmp_path / "out", **overrides)

    return make


@pytest.fixture(scope="session")
def straight_run(toy, tmp_path_factory):
    """`python -m flare train` for 8 steps in one go (batch 4, seed 0): out_dir and its losses."""
    root = tmp_path_factory.mktemp("straight")
    cfg = toy_train_config(toy.flare, toy.data, root / "out", steps=STRAIGHT_STEPS, save_every=STRAIGHT_STEPS)
    config = write_config(root / "train.yaml", cfg)
    run(train_cmd(config))
    return SimpleNamespace(out=root / "out", config=config, cfg=cfg, losses=losses(root / "out"))
