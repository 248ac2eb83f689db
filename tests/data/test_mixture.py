"""Mixture weights: validated, normalised, honoured over many draws, reproducible from a seed."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from flare.data import Mixture


def test_weights_honoured_within_tolerance_over_20k_draws():
    mix = Mixture({"math": 0.4, "chat": 0.6, "long": 1.0})  # normalised: 0.2, 0.3, 0.5
    assert mix.probabilities == pytest.approx({"math": 0.2, "chat": 0.3, "long": 0.5})
    n = 20_000
    counts = Counter(mix.sample(n, torch.Generator().manual_seed(0)))
    for name, p in mix.probabilities.items():
        # 4.5 standard deviations of a binomial proportion: fails on a wrong weight, not on noise.
        assert abs(counts[name] / n - p) < 4.5 * math.sqrt(p * (1 - p) / n), (name, counts)


def test_draws_are_reproducible_from_the_seed():
    mix = Mixture({"a": 1, "b": 3})
    first = mix.sample(500, torch.Generator().manual_seed(7))
    assert first == mix.sample(500, torch.Generator().manual_seed(7))
    assert first != mix.sample(500, torch.Generator().manual_seed(8))


@pytest.mark.parametrize("weights", [{}, {"a": 0}, {"a": -1, "b": 2}, {"a": float("nan")}, {"a": float("inf")},
                                     {"a": "0.5"}, {"a": True}, {"": 1.0}, {1: 1.0}])
def test_bad_weights_raise(weights):
    with pytest.raises(ValueError):
        Mixture(weights)
