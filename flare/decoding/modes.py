"""Decoding modes by name: which lane runs each mode (its options live in ``flare.decoding.options``)."""

from __future__ import annotations

from typing import Callable

from flare.decoding.ar_trust import ArTrustLane
from flare.decoding.blockwise import BlockLane
from flare.decoding.causal import CausalLane
from flare.decoding.lane import Lane
from flare.decoding.options import OPTIONS

# mode -> (model, slots, resolved options) -> Lane
LANES: dict[str, Callable[..., Lane]] = {
    "causal": CausalLane,
    "ar_trust": ArTrustLane,
    "diffusion_trust": BlockLane,
    "low_confidence": BlockLane,
    "llada": BlockLane,
}
assert LANES.keys() == OPTIONS.keys()
