"""Decoding strategies: one implementation per mode, all on the same model and caches."""

from flare.decoding.params import SamplingParams
from flare.decoding.registry import MODES, decode
from flare.decoding.result import DecodeResult

__all__ = ["DecodeResult", "MODES", "SamplingParams", "decode"]
