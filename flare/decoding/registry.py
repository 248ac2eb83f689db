"""Decoding modes by name: the one table the CLI, the engine and the evaluation look modes up in."""

from __future__ import annotations

from typing import Callable

from flare.decoding.causal import generate_causal
from flare.decoding.params import SamplingParams
from flare.decoding.result import DecodeResult
from flare.model import FlareModel

Decoder = Callable[[FlareModel, list[list[int]], SamplingParams], DecodeResult]

MODES: dict[str, Decoder] = {"causal": generate_causal}


def decode(model: FlareModel, prompts: list[list[int]], params: SamplingParams, mode: str = "causal") -> DecodeResult:
    if mode not in MODES:
        raise ValueError(f"unknown decoding mode {mode!r}; available: {', '.join(MODES)}")
    return MODES[mode](model, prompts, params)
