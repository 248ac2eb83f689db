"""Decoding fixtures: tiny checkpoints with a [MASK] row, so every mode can run on them."""

from __future__ import annotations

import copy

import pytest

from flare.testing.checkpoints import FAMILIES

MASK = 95


@pytest.fixture(scope="session")
def flare_models(tiny_models):
    """family -> a copy of the tiny model whose config names a mask token (as `flare convert` would)."""
    out = {}
    for fam in FAMILIES:
        model = copy.deepcopy(tiny_models[fam][0])
        model.config.mask_token_id = MASK
        out[fam] = model
    return out
