"""Decoding strategies: what each mode is, one implementation per mode, all on the same model and caches.

A mode and its options are one typed object (``flare.decoding.options``: ``ArTrustOptions(gen_block=4)``, or
the text ``ar_trust:gen_block=4`` read by ``parse_mode``); ``check_request`` checks a request against a
checkpoint and fills unset options from it. Each mode is a lane (``flare.decoding.lane``) over cache slots;
how lanes are scheduled into forwards (the stepper, the runners, ``decode``) is ``flare.engine``'s.
"""

from flare.decoding.modes import LANES
from flare.decoding.options import (
    OPTIONS,
    ArTrustOptions,
    BlockOptions,
    CausalOptions,
    DiffusionTrustOptions,
    LladaOptions,
    LowConfidenceOptions,
    ModeOptions,
    as_options,
    make_options,
    mode_from_json,
    parse_mode,
    parse_modes,
)
from flare.decoding.params import SamplingParams
from flare.decoding.request import check_request

__all__ = ["LANES", "OPTIONS", "ArTrustOptions", "BlockOptions", "CausalOptions", "DiffusionTrustOptions",
           "LladaOptions", "LowConfidenceOptions", "ModeOptions", "SamplingParams", "as_options", "check_request",
           "make_options", "mode_from_json", "parse_mode", "parse_modes"]
