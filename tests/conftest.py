"""Shared fixtures: seeded tiny checkpoints of every family, built once per test session."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import flare
from flare.testing.checkpoints import FAMILIES, hf_model, save_tiny_checkpoint

# Front doors decode in bf16 by default where the CPU has it natively (flare.device); the suite pins the
# checkpoint's own dtype so that it runs alike on every machine (subprocesses inherit this). Tests of the
# default itself set the variable back.
os.environ["FLARE_DTYPE"] = "stored"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The test models are tiny: one intra-op thread is faster, and far steadier on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> directory of a seeded tiny checkpoint (with a character tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: save_tiny_checkpoint(root / fam, fam, seed=1) for fam in FAMILIES}


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    """family -> (flare model, transformers reference with the same weights)."""
    return {fam: (flare.load_model(d), hf_model(fam, seed=1)) for fam, d in tiny_dirs.items()}


MASK = 95  # the [MASK] id the decoding fixtures' configs name


@pytest.fixture(scope="session")
def flare_models(tiny_models):
    """family -> a copy of the tiny model whose config names a mask token (as `flare convert` would)."""
    out = {}
    for fam in FAMILIES:
        model = copy.deepcopy(tiny_models[fam][0])
        model.config.mask_token_id = MASK
        out[fam] = model
    return out


@pytest.fixture(autouse=True)
def _fresh_pacing(request):
    """What AR-Trust's pacers learn stays with a model (``FlareModel.pacing``); each test starts without it."""
    yield
    if "flare_models" in request.fixturenames:
        for model in request.getfixturevalue("flare_models").values():
            model.pacing.clear()
