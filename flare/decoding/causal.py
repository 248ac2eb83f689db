"""Causal (AR) decoding: prefill the prompts, then one token per sequence per forward from the caches."""

from __future__ import annotations

import torch

from flare.decoding.params import SamplingParams
from flare.decoding.prompts import check_prompts, stop_ids, trim_at_stop
from flare.decoding.result import DecodeResult
from flare.decoding.runner import CachedRunner
from flare.model import FlareModel
from flare.ops.sampling import sample


@torch.no_grad()
def generate_causal(
    model: FlareModel, prompts: list[list[int]], params: SamplingParams, runner_cls: type = CachedRunner
) -> DecodeResult:
    check_prompts(prompts, model.config.vocab_size)
    device = model.device
    B, n_new = len(prompts), params.max_new_tokens
    runner = runner_cls(model, B, max(len(p) for p in prompts) + n_new)
    temp, top_k, top_p = params.row_tensors(B, device)
    gen = params.generator(device)
    stops = stop_ids(params.stop_token_ids, model.config.eos_token_ids, params.ignore_eos)
    stop_t = torch.tensor(stops, dtype=torch.long, device=device)

    logits = runner.prefill(prompts)
    out = torch.zeros(B, n_new, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    active = torch.zeros(B, dtype=torch.long, device=device)
    for step in range(n_new):
        active += (~finished).long()
        # Greedy is decided on the host once per request, so the full filtered distribution is never built.
        tok = logits.argmax(-1) if params.greedy else sample(logits, temp, top_k, top_p, gen)
        out[:, step] = tok
        finished |= torch.isin(tok, stop_t)
        # One host check per step (not per row), only when something can stop the batch early.
        if step == n_new - 1 or (stops and runner.sync(finished)):
            break
        logits = runner.append(tok[:, None])
    tokens, reasons = trim_at_stop(out[:, : step + 1], stops, n_new)
    return DecodeResult("causal", tokens, reasons, runner.forwards, int(active.sum()),
                        kernel_paths=model.kernel_paths())
