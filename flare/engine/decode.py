"""``decode``: a batch of prompts in one mode, run to completion on a stepper with one lane."""

from __future__ import annotations

from flare.decoding.options import ModeOptions, as_options
from flare.decoding.params import SamplingParams
from flare.decoding.request import check_request
from flare.engine.result import DecodeResult
from flare.engine.runner import CachedRunner, ReferenceRunner
from flare.engine.stepper import Admission, Stepper
from flare.model import FlareModel


def decode(
    model: FlareModel,
    prompts: list[list[int]],
    params: SamplingParams,
    mode: str | ModeOptions = "causal",
    *,
    reference: bool = False,
) -> DecodeResult:
    """Decode ``prompts`` (token ids) with ``mode``: options such as ``ArTrustOptions(gen_block=4)``, or their
    text ``"ar_trust:gen_block=4"``; unset options come from the checkpoint. ``reference=True`` runs the same
    strategy without caches, recomputing every forward from the full sequence: the ground truth the cached path
    is tested against."""
    options = check_request(model.config, prompts, as_options(mode))
    B = len(prompts)
    stepper = Stepper(model, B, max(len(p) for p in prompts) + params.max_new_tokens + 64,
                      ReferenceRunner if reference else CachedRunner)
    # One random stream for the whole batch, as a seeded batch call is expected to behave.
    gen = params.generator(model.device)
    stepper.admit([Admission(s, options, p, params, gen) for s, p in enumerate(prompts)])
    while stepper.step():
        pass
    tokens, reasons = zip(*(stepper.output(s) for s in range(B)))
    emitted = stepper.emitted
    return DecodeResult(
        options, list(tokens), list(reasons), stepper.runner.forwards, sum(e.forwards for e in emitted),
        drafted=sum(e.drafted for e in emitted), accepted=sum(e.accepted for e in emitted),
        kernel_paths=model.kernel_paths(),
    )
