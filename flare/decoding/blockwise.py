"""Block-wise parallel denoising: Diffusion-Trust and the low-confidence peer decoders, one loop (method §3).

A block of rows after the committed tokens: Diffusion-Trust's ``[seed, MASK x (b-1)]`` (the seed, sampled from
the last causal logits, is a clean row) or the peers' ``[MASK x b]``. With the logit shift, block position j is
predicted by row j-1, and position 0 by the last committed row. Each denoising step is one read-only forward;
it samples every undecided position and commits some by confidence (the untempered probability of the sampled
token). When the block is decided, one causal forward commits it to the caches and gives the logits for what
follows.
"""

from __future__ import annotations

import torch

from flare.decoding.options import BlockOptions
from flare.decoding.params import SamplingParams
from flare.decoding.prompts import check_prompts, require_mask, stop_ids, trim_at_stop
from flare.decoding.result import DecodeResult
from flare.decoding.runner import CachedRunner
from flare.model import FlareModel
from flare.ops.sampling import sample


def _choose(conf: torch.Tensor, undecided: torch.Tensor, options: BlockOptions, step: int, max_steps: int):
    """Which undecided positions to commit this step [B, T] (at least one per row that has any)."""
    conf = torch.where(undecided, conf, torch.full_like(conf, -1.0))
    best = torch.zeros_like(undecided).scatter(1, conf.argmax(1, keepdim=True), True) & undecided
    if step == max_steps - 1:
        return undecided
    if options.threshold is not None:
        return (undecided & (conf > options.threshold)) | best
    # Fixed steps: commit the most confident ceil(remaining / steps left) positions.
    left = undecided.sum(1)
    k = -(-left // (max_steps - step))
    rank = conf.argsort(1, descending=True).argsort(1)
    return undecided & (rank < k[:, None])


@torch.no_grad()
def generate_blockwise(
    model: FlareModel,
    prompts: list[list[int]],
    params: SamplingParams,
    options: BlockOptions,
    *,
    mode: str,
    seeded: bool,
    runner_cls: type = CachedRunner,
) -> DecodeResult:
    check_prompts(prompts, model.config.vocab_size)
    mask_id = require_mask(model, mode)
    device, B, T = model.device, len(prompts), options.block_size
    n_new = params.max_new_tokens
    temp, top_k, top_p = params.row_tensors(B, device)
    gen = params.generator(device)
    stops = stop_ids(params.stop_token_ids, model.config.eos_token_ids, params.ignore_eos)
    stop_t = torch.tensor(stops, dtype=torch.long, device=device)
    max_steps = options.steps if options.steps is not None else T

    runner = runner_cls(model, B, max(len(p) for p in prompts) + n_new + 2 * T)
    last = runner.prefill(prompts)  # [B, V] logits for the token after each prompt
    out = torch.zeros(B, n_new + T, dtype=torch.long, device=device)
    out_len = torch.zeros(B, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    active = torch.ones(B, dtype=torch.long, device=device)
    positions = torch.arange(T, device=device)
    n_clean = 1 if seeded else 0
    while True:
        block = torch.full((B, T), mask_id, dtype=torch.long, device=device)
        undecided = torch.ones(B, T, dtype=torch.bool, device=device)
        if seeded:
            block[:, 0] = sample(last, temp, top_k, top_p, gen)
            undecided[:, 0] = False
        for step in range(max_steps):
            if step > 0 and not bool(undecided.any()):
                break
            active += (~finished & undecided.any(1)).long()
            logits = runner.rows(block, n_clean)  # [B, T, V]
            pred = torch.cat([last[:, None], logits[:, :-1]], dim=1)  # shifted: position j <- row j-1
            flat = pred.reshape(B * T, -1)
            if params.greedy:
                cand = flat.argmax(-1).view(B, T)
            else:
                cand = sample(flat, temp.repeat_interleave(T), top_k.repeat_interleave(T),
                              top_p.repeat_interleave(T), gen).view(B, T)
            conf = torch.softmax(flat.float(), -1).gather(-1, cand.view(-1, 1)).view(B, T)
            commit = _choose(conf, undecided, options, step, max_steps)
            block = torch.where(commit, cand, block)
            undecided &= ~commit
        last = runner.append(block)
        active += (~finished).long()
        live = ~finished
        out.scatter_(1, (out_len[:, None] + positions).clamp(max=out.shape[1] - 1), block)
        n_emit = torch.where(live, torch.full_like(out_len, T), torch.zeros_like(out_len))
        finished |= (torch.isin(block, stop_t) & live[:, None]).any(1)
        out_len += n_emit
        finished |= out_len >= n_new
        if runner.sync(finished):
            break
    tokens, reasons = trim_at_stop(out, stops, n_new, lengths=out_len.tolist())
    return DecodeResult(mode, tokens, reasons, runner.forwards, int(active.sum()), kernel_paths=model.kernel_paths())
