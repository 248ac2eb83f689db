"""Decoding strategies: one implementation per mode, all on the same model and caches.

``decode(model, prompts, params, mode, **options)``: modes ``causal``, ``ar_trust``, ``diffusion_trust``,
``low_confidence`` and ``llada``; each mode's options and their defaults live in ``flare.decoding.options``.
Each mode is a lane (``flare.decoding.lane``) that a ``Stepper`` runs beside other lanes, one forward per step;
``decode`` is a stepper with a single lane, the serving engine one with a lane per mode in use.
"""

from flare.decoding.modes import MODES, mode_label, mode_options
from flare.decoding.params import SamplingParams
from flare.decoding.registry import decode
from flare.decoding.result import DecodeResult
from flare.decoding.stepper import Admission, Stepper

__all__ = ["Admission", "DecodeResult", "MODES", "SamplingParams", "Stepper", "decode", "mode_label", "mode_options"]
