"""Decoding strategies: one implementation per mode, all on the same model and caches.

``decode(model, prompts, params, mode, **options)``: modes ``causal``, ``ar_trust``, ``diffusion_trust``,
``low_confidence`` and ``llada``; each mode's options and their defaults live in ``flare.decoding.options``.
"""

from flare.decoding.params import SamplingParams
from flare.decoding.registry import MODES, decode, mode_options
from flare.decoding.result import DecodeResult

__all__ = ["DecodeResult", "MODES", "SamplingParams", "decode", "mode_options"]
