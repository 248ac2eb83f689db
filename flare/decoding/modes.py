"""Decoding modes by name: the one table the CLI, ``decode``, the engine and the evaluation look modes up in."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

from flare.decoding.ar_trust import ArTrustLane
from flare.decoding.blockwise import BlockLane
from flare.decoding.causal import CausalLane
from flare.decoding.lane import Lane
from flare.decoding.options import (
    ArTrustOptions,
    CausalOptions,
    DiffusionTrustOptions,
    LladaOptions,
    LowConfidenceOptions,
)


@dataclass(frozen=True)
class Mode:
    lane: Callable[..., Lane]  # (model, slots, options) -> Lane
    options: type
    needs_mask: bool = True  # only a FLARE checkpoint (with a [MASK] token) can run it


def _block(mode: str, seeded: bool) -> Callable[..., Lane]:
    return functools.partial(BlockLane, mode=mode, seeded=seeded)


MODES: dict[str, Mode] = {
    "causal": Mode(CausalLane, CausalOptions, needs_mask=False),
    "ar_trust": Mode(ArTrustLane, ArTrustOptions),
    "diffusion_trust": Mode(_block("diffusion_trust", seeded=True), DiffusionTrustOptions),
    "low_confidence": Mode(_block("low_confidence", seeded=False), LowConfidenceOptions),
    "llada": Mode(_block("llada", seeded=False), LladaOptions),
}


def mode_options(mode: str, **options: Any):
    """The validated options of ``mode``; unknown option names are an error naming the mode's options."""
    if mode not in MODES:
        raise ValueError(f"unknown decoding mode {mode!r}; available: {', '.join(MODES)}")
    cls = MODES[mode].options
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"mode {mode!r} takes options {sorted(known) or 'none'}, not {unknown}")
    return cls(**options)


def mode_label(mode: str | None, options: dict[str, Any] | None = None) -> str:
    """How a mode and the options it was given are named in tables and logs: ``low_confidence:block_size=3``
    (the syntax ``flare eval --modes`` reads); None is a server's default mode."""
    if mode is None:
        return "server default"
    return ":".join([mode, *(f"{k}={v}" for k, v in (options or {}).items())])
