"""``decode``: a batch of prompts in one mode, run to completion on a stepper with one lane."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from flare.decoding.options import ModeOptions, as_options
from flare.decoding.params import SamplingParams
from flare.decoding.request import check_request
from flare.engine.compiled import keeps_graphs
from flare.engine.result import DecodeResult
from flare.engine.reference import ReferenceRunner
from flare.engine.runner import CachedRunner
from flare.engine.stepper import Admission, Stepper
from flare.model import FlareModel


# Where decoding is graphed: the runners ``decode`` keeps per model, batch and capacity (a power of two), so that
# the graphs captured over their caches serve the next calls of that shape (each new cache would need its own).
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kept_runner(model: FlareModel, slots: int, capacity: int) -> CachedRunner:
    """A restarted runner of ``slots`` slots and at least ``capacity`` KV slots, kept for the next calls."""
    capacity = 1 << (capacity - 1).bit_length()
    runners = _KEPT.setdefault(model, {})
    runner = runners.get((slots, capacity))
    if runner is None:
        runner = runners[slots, capacity] = CachedRunner(model, slots, capacity)
    else:
        runner.restart()
    return runner


@torch.inference_mode()  # as the stepper's own methods (flare.engine.stepper): a kept runner restarts in it
def decode(
    model: FlareModel,
    prompts: list[list[int]],
    params: SamplingParams | Sequence[SamplingParams],
    mode: str | ModeOptions = "causal",
    *,
    reference: bool = False,
) -> DecodeResult:
    """Decode ``prompts`` (token ids) with ``mode``: options such as ``ArTrustOptions(gen_block=4)``, or their
    text ``"ar_trust:gen_block=4"``; unset options come from the checkpoint. ``params``: one for every prompt
    (a seeded one draws the whole batch from one random stream), or one per prompt (each seeded one its own
    stream). ``reference=True`` runs the same strategy without caches, recomputing every forward from the full
    sequence: the ground truth the cached path is tested against."""
    options = check_request(model.config, prompts, as_options(mode))
    B = len(prompts)
    if isinstance(params, SamplingParams):
        gen = params.generator(model.device)
        each = [(params, gen)] * B
    else:
        if len(params) != B:
            raise ValueError(f"{len(params)} sampling params for {B} prompts: give one, or one per prompt")
        each = [(p, p.generator(model.device)) for p in params]
    capacity = max(len(p) for p in prompts) + max(p.max_new_tokens for p, _ in each) + 64
    runner = None if reference or not keeps_graphs(model) else kept_runner(model, B, capacity)
    stepper = Stepper(model, B, capacity, ReferenceRunner if reference else CachedRunner, runner=runner)
    stepper.admit([Admission(s, options, p, *each[s]) for s, p in enumerate(prompts)])
    while stepper.step():
        pass
    tokens, reasons = zip(*(stepper.output(s) for s in range(B)))
    emitted = stepper.emitted
    return DecodeResult(
        options, list(tokens), list(reasons), stepper.runner.forwards, sum(e.forwards for e in emitted),
        drafted=sum(e.drafted for e in emitted), accepted=sum(e.accepted for e in emitted),
        kernel_paths=model.kernel_paths(),
    )
