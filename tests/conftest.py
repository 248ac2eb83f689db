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

# Run in parallel (``make test``: ``pytest -n``), each worker has its share of the cores: the subprocesses a test
# starts (the recipes, the benchmarks, ``flare serve``) get that many intra-op threads instead of every core's,
# which two workers' subprocesses would fight over (OpenMP threads spin while they wait for a busy core: the
# SmolLM2 quick recipe took 2.7x its time beside another worker with two threads). An explicit setting is kept.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first (the order is otherwise kept): run in parallel, the longest then starts at
    once and the many short ones fill the other workers beside it, instead of one worker finishing it alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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
