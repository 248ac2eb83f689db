"""AR-Trust: self-speculative decoding whose output follows the AR model's distribution exactly (method §3).

Each round is ONE forward over ``[pending, d_1 .. d_{N-1}, MASK x (N-1)]``: the causal rows give the target
law p for every draft (and a bonus row), the MASK rows draft the next round with proposal law q, which is stored
at draft time. Speculative sampling accepts a prefix of the drafts; the cache then commits exactly the pending
token and the accepted drafts (per-position GDN and conv states, no replay).

After a rejection (and before the first round) a sequence has no drafts: its next round is a cold start
``[pending, MASK x (N-1)]``, which yields one token and fresh drafts. Cold and warm sequences share one batched
forward: a cold row's block simply starts earlier and ends in padding (per-row ``num_clean``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flare.decoding.options import ArTrustOptions
from flare.decoding.params import SamplingParams
from flare.decoding.prompts import check_prompts, require_mask, stop_ids, trim_at_stop
from flare.decoding.result import DecodeResult
from flare.decoding.runner import CachedRunner
from flare.model import FlareModel
from flare.ops.sampling import draw, filtered_probs, speculative_verify


def _laws(logits_BNV, temp, top_k, top_p, filtered: bool):
    """The sampling law of every row [B, N, V]; the top-k/top-p sort only when a filter is on."""
    B, N, V = logits_BNV.shape
    if not filtered:
        return torch.softmax(logits_BNV.float() / temp[:, None, None].float(), dim=-1)
    flat = filtered_probs(logits_BNV.reshape(B * N, V), temp.repeat_interleave(N), top_k.repeat_interleave(N),
                          top_p.repeat_interleave(N))
    return flat.view(B, N, V)


@torch.no_grad()
def generate_ar_trust(
    model: FlareModel,
    prompts: list[list[int]],
    params: SamplingParams,
    options: ArTrustOptions | None = None,
    runner_cls: type = CachedRunner,
) -> DecodeResult:
    options = options or ArTrustOptions()
    check_prompts(prompts, model.config.vocab_size)
    mask_id = require_mask(model, "ar_trust")
    device, V = model.device, model.config.vocab_size
    N, M, B = options.gen_block, options.gen_block - 1, len(prompts)
    n_new = params.max_new_tokens
    temp, top_k, top_p = params.row_tensors(B, device)
    gen = params.generator(device)
    stops = stop_ids(params.stop_token_ids, model.config.eos_token_ids, params.ignore_eos)
    stop_t = torch.tensor(stops, dtype=torch.long, device=device)

    # Commit all but the last prompt token: that one is the first pending token.
    runner = runner_cls(model, B, max(len(p) for p in prompts) + n_new + 2 * N)
    if max(len(p) for p in prompts) > 1:
        runner.prefill([p[:-1] for p in prompts])
    forwards = runner.forwards
    pending = torch.tensor([p[-1] for p in prompts], device=device)
    # Cold rows (before the first round, after a rejection) have no drafts: their round is [pending, MASK x M]
    # (1 token + fresh drafts); warm rows verify their drafts: [pending, d_1..d_M, MASK x M].
    cold = torch.ones(B, dtype=torch.bool, device=device)
    drafts = torch.zeros(B, M, dtype=torch.long, device=device)
    # Greedy decoding needs no laws: a draft passes iff it is the argmax (speculative sampling with one-hot p
    # and q), so no vocabulary-sized tensor is built per round.
    greedy = params.greedy
    q = None if greedy else torch.zeros(B, M, V, device=device)

    out = torch.zeros(B, n_new + N, dtype=torch.long, device=device)
    out_len = torch.zeros(B, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    active = torch.full((B,), forwards, dtype=torch.long, device=device)
    drafted = torch.zeros(B, dtype=torch.long, device=device)
    accepted_total = torch.zeros(B, dtype=torch.long, device=device)
    steps = torch.arange(N, device=device)
    masks_row = torch.full((B, M), mask_id, dtype=torch.long, device=device)
    while True:
        middle = torch.where(cold[:, None], masks_row, drafts)
        rows = torch.cat([pending[:, None], middle, masks_row], dim=1)  # [B, 2N-1]; cold rows end in padding
        n_clean = torch.where(cold, 1, N)
        logits = runner.rows(rows, n_clean, M, record=True)
        live = ~finished
        active += live.long()

        if greedy:
            target = logits[:, :N].argmax(-1)  # [B, N]
            accepted = (drafts == target[:, :M]).long().cumprod(-1).sum(-1)
            accepted = torch.where(cold, torch.zeros_like(accepted), accepted)
            nxt = target.gather(1, accepted[:, None])[:, 0]
        else:
            p = _laws(logits[:, :N], temp, top_k, top_p, params.filtered)
            accepted, nxt = speculative_verify(p, q, drafts, gen,
                                               exact=options.draft_policy != "argmax_truncated")
            accepted = torch.where(cold, torch.zeros_like(accepted), accepted)
            nxt = torch.where(cold, draw(p[:, 0], gen), nxt)
        runner.commit_recorded(accepted + 1)

        # The MASK rows follow the clean rows: they draft the tokens after next (shifted logits).
        at = n_clean[:, None] + torch.arange(M, device=device)
        draft_logits = logits.gather(1, at[:, :, None].expand(B, M, V))
        if greedy:
            d_new, q_new = draft_logits.argmax(-1), None
        elif options.draft_policy == "exact_truncated":
            q_new = _laws(draft_logits, temp, top_k, top_p, params.filtered)
            d_new = draw(q_new.reshape(B * M, V), gen).view(B, M)
        else:
            d_new = draft_logits.argmax(-1)
            q_new = F.one_hot(d_new, V).float()

        emitted = torch.cat([drafts, nxt[:, None]], dim=1).scatter(1, accepted[:, None], nxt[:, None])
        n_emit = torch.where(live, accepted + 1, torch.zeros_like(accepted))
        out.scatter_(1, (out_len[:, None] + steps).clamp(max=out.shape[1] - 1), emitted)
        hit_stop = (torch.isin(emitted, stop_t) & (steps < n_emit[:, None])).any(1)
        out_len += n_emit
        drafted += (live & ~cold).long() * M
        accepted_total += torch.where(live, accepted, torch.zeros_like(accepted))
        finished |= hit_stop | (out_len >= n_new)

        # The MASK rows' drafts are valid for the next round after a cold round or a full acceptance (they
        # assumed exactly the context that was committed); a rejection sends the row to a cold round.
        cold = ~cold & (accepted < M)
        drafts, q = d_new, q_new
        pending = nxt

        if runner.sync(finished):
            break

    tokens, reasons = trim_at_stop(out, stops, n_new, lengths=out_len.tolist())
    return DecodeResult(
        "ar_trust", tokens, reasons, runner.forwards, int(active.sum()), drafted=int(drafted.sum()),
        accepted=int(accepted_total.sum()), kernel_paths=model.kernel_paths(),
    )
