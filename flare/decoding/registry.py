"""Decoding modes by name: the one table the CLI, the engine and the evaluation look modes up in."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from flare.decoding.ar_trust import generate_ar_trust
from flare.decoding.blockwise import generate_blockwise
from flare.decoding.causal import generate_causal
from flare.decoding.options import (
    ArTrustOptions,
    CausalOptions,
    DiffusionTrustOptions,
    LladaOptions,
    LowConfidenceOptions,
)
from flare.decoding.params import SamplingParams
from flare.decoding.result import DecodeResult
from flare.decoding.runner import CachedRunner, ReferenceRunner
from flare.model import FlareModel


@dataclass(frozen=True)
class Mode:
    run: Callable[..., DecodeResult]  # (model, prompts, params, options, runner_cls) -> result
    options: type


def _causal(model, prompts, params, options, runner_cls):
    return generate_causal(model, prompts, params, runner_cls)


def _blockwise(mode: str, seeded: bool):
    def run(model, prompts, params, options, runner_cls):
        return generate_blockwise(model, prompts, params, options, mode=mode, seeded=seeded, runner_cls=runner_cls)

    return run


def _ar_trust(model, prompts, params, options, runner_cls):
    return generate_ar_trust(model, prompts, params, options, runner_cls)


MODES: dict[str, Mode] = {
    "causal": Mode(_causal, CausalOptions),
    "ar_trust": Mode(_ar_trust, ArTrustOptions),
    "diffusion_trust": Mode(_blockwise("diffusion_trust", seeded=True), DiffusionTrustOptions),
    "low_confidence": Mode(_blockwise("low_confidence", seeded=False), LowConfidenceOptions),
    "llada": Mode(_blockwise("llada", seeded=False), LladaOptions),
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


def decode(
    model: FlareModel,
    prompts: list[list[int]],
    params: SamplingParams,
    mode: str = "causal",
    *,
    reference: bool = False,
    **options: Any,
) -> DecodeResult:
    """Decode ``prompts`` (token ids) with ``mode``. ``reference=True`` runs the same strategy without caches,
    recomputing every forward from the full sequence: the ground truth the cached path is tested against."""
    opts = mode_options(mode, **options)
    return MODES[mode].run(model, prompts, params, opts, ReferenceRunner if reference else CachedRunner)
