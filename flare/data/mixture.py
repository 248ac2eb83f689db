"""Mixture: validated, normalised weights over named sources, and seeded draws from them."""

from __future__ import annotations

import math
from numbers import Real
from typing import Mapping

import torch


class Mixture:
    """Weights such as ``{"math": 0.4, "chat": 0.6}``: positive, finite, normalised to sum to 1.

    Draws are iid per row (multinomial with replacement) from a caller-owned ``torch.Generator``, so the
    caller's generator state is the whole position of the stream.
    """

    def __init__(self, weights: Mapping[str, float]) -> None:
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError("a mixture needs at least one named source with a weight")
        for name, w in weights.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"source names must be non-empty strings, got {name!r}")
            if isinstance(w, bool) or not isinstance(w, Real):
                raise ValueError(f"weight of {name!r} must be a number, got {w!r}")
            if not math.isfinite(w) or w <= 0:
                raise ValueError(f"weight of {name!r} must be positive and finite, got {w!r}")
        total = float(sum(weights.values()))
        self.names: tuple[str, ...] = tuple(weights)
        self.probabilities: dict[str, float] = {n: float(w) / total for n, w in weights.items()}
        self._probs = torch.tensor([self.probabilities[n] for n in self.names], dtype=torch.float64)

    def __repr__(self) -> str:
        return f"Mixture({', '.join(f'{n}={p:.3g}' for n, p in self.probabilities.items())})"

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        """``n`` source names drawn iid with the mixture's probabilities."""
        if len(self.names) == 1:
            return [self.names[0]] * n
        picks = torch.multinomial(self._probs, n, replacement=True, generator=generator)
        return [self.names[i] for i in picks.tolist()]
