"""Naive decoders without caches: every step re-runs the whole sequence. Slow, obviously right: the ground
truth that the cached decoders are tested against."""

from __future__ import annotations

import torch

from flare.decoding.params import SamplingParams
from flare.decoding.prompts import check_prompts, stop_ids, trim_at_stop
from flare.decoding.result import DecodeResult
from flare.model import FlareModel
from flare.ops.sampling import sample


@torch.no_grad()
def reference_causal(model: FlareModel, prompts: list[list[int]], params: SamplingParams) -> DecodeResult:
    """One prompt at a time, the full sequence each step, so no cache or padding can be involved."""
    check_prompts(prompts, model.config.vocab_size)
    stops = stop_ids(params.stop_token_ids, model.config.eos_token_ids, params.ignore_eos)
    rows, forwards = [], 0
    for prompt in prompts:
        seq = list(prompt)
        temp, top_k, top_p = params.row_tensors(1, model.device)
        gen = params.generator(model.device)
        for _ in range(params.max_new_tokens):
            logits = model(torch.tensor([seq], device=model.device))[:, -1]
            forwards += 1
            tok = int(sample(logits, temp, top_k, top_p, gen)[0])
            seq.append(tok)
            if tok in stops:
                break
        rows.append(seq[len(prompt):] + [0] * (params.max_new_tokens - (len(seq) - len(prompt))))
    tokens, reasons = trim_at_stop(torch.tensor(rows), stops, params.max_new_tokens)
    return DecodeResult("causal_reference", tokens, reasons, forwards, forwards)
