"""``decode``: a batch of prompts in one mode, run to completion on a stepper with one lane."""

from __future__ import annotations

from typing import Any

from flare.decoding.modes import MODES, mode_options
from flare.decoding.params import SamplingParams
from flare.decoding.prompts import check_prompts, require_mask
from flare.decoding.result import DecodeResult
from flare.decoding.runner import CachedRunner, ReferenceRunner
from flare.decoding.stepper import Admission, Stepper
from flare.model import FlareModel


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
    check_prompts(prompts, model.config.vocab_size)
    if MODES[mode].needs_mask:
        require_mask(model, mode)
    B = len(prompts)
    stepper = Stepper(model, B, max(len(p) for p in prompts) + params.max_new_tokens + 64,
                      ReferenceRunner if reference else CachedRunner)
    # One random stream for the whole batch, as a seeded batch call is expected to behave.
    gen = params.generator(model.device)
    stepper.admit([Admission(s, mode, opts, p, params, gen) for s, p in enumerate(prompts)])
    while stepper.step():
        pass
    slots = stepper.slots
    rows, lengths = slots.out.tolist(), slots.out_len.tolist()
    tokens, reasons = zip(*(slots.tokens(s, rows[s], lengths[s]) for s in range(B)))
    return DecodeResult(
        mode, list(tokens), list(reasons), stepper.runner.forwards, int(slots.active_forwards.sum()),
        drafted=int(slots.drafted.sum()), accepted=int(slots.accepted.sum()), kernel_paths=model.kernel_paths(),
    )
