"""Token sampling: temperature, top-k and top-p filtering, and draws from the filtered distribution.

Every function is batched over rows with per-row settings, so one call serves a batch of requests with different
parameters and nothing syncs with the host.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch


# On the CPU the vocabulary is searched in chunks of this many logits (``argmax``).
ARGMAX_CHUNK = 512


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)``, the first of tied maxima included. On the CPU, argmax over bf16 rows runs on one
    thread unvectorised and ``max(-1)``, which also returns indices, runs at a third of the speed of ``amax``; so
    the maximum of each chunk of ``ARGMAX_CHUNK`` logits comes from ``amax``, and indices only from the first
    chunk holding the row's maximum (2 threads, bf16, 49,153 logits: 25 rows 441 -> 254 us, 72 rows
    1,234 -> 651 us; 9 rows of 248,320: 855 -> 372 us; against argmax, 4-5x more)."""
    V = logits.shape[-1]
    n = V // ARGMAX_CHUNK
    if n < 2 or logits.device.type != "cpu":
        return logits.max(-1).indices
    W = ARGMAX_CHUNK
    chunk = logits[..., :n * W].unflatten(-1, (n, W)).amax(-1).max(-1).indices  # the first chunk with the max
    start = chunk * W
    value, at = logits.gather(-1, start[..., None] + torch.arange(W, device=logits.device)).max(-1)
    best = start + at
    if V > n * W:  # the logits after the last whole chunk
        value_tail, at_tail = logits[..., n * W:].max(-1)
        best = torch.where(value_tail > value, at_tail + n * W, best)
    return best


class Filters(NamedTuple):
    """What a batch's rows filter by, known on the host (``SlotBatch.filters``), so that no filter costs where no
    row asks for it: the largest ``top_k`` of the rows (0: none filters by top-k), whether a row without top-k
    filters by ``top_p``, and whether a row is greedy (temperature 0: its one-hot)."""

    k_max: int
    nucleus: bool
    greedy: bool = True


def filtered_probs(
    logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor,
    filters: Filters | None = None,
) -> torch.Tensor:
    """The distribution a sampler draws from: softmax(logits / T) restricted to top-k and top-p, renormalised.
    ``logits`` [B, V], or [B, ..., V] where each of the B settings holds for all of its row's positions.

    ``top_k`` 0 and ``top_p`` 1.0 disable each filter. Rows with temperature 0 get a one-hot on the argmax. Both
    filters keep a prefix of the tokens by descending probability: the first ``top_k``, and those before which
    the mass is below ``top_p`` (so the top token always stays). ``filters``: what the rows ask for, known on the
    host; None: not known, and the vocabulary is sorted (``sorted_filter``, the reference). On the CPU with
    ``filters``, a row with top-k filters among its ``k_max`` most likely tokens (``topk``) and a row with top-p
    alone finds its nucleus's smallest probability by a radix select over the float bits (``nucleus_floor``); on
    2 threads of an EPYC, rows of 49,152 probabilities, 1 / 9 / 72 rows: sorted 3.8 / 19.8 / 167 ms, the nucleus
    selected 0.8 / 6.4 / 49, the top 20 of each 0.34 / 1.5 / 12.8, no filter 0.14 / 0.49 / 4.4. The two paths
    agree but where probabilities tie at the nucleus's edge (the select keeps every tied token, a sort some of
    them) or the mass reaches ``top_p`` within float rounding (the sums run in another order)."""
    shape = logits_BV.shape
    rep = logits_BV[..., 0].numel() // shape[0]
    if rep > 1:
        temperature_B, top_k_B, top_p_B = (x.repeat_interleave(rep) for x in (temperature_B, top_k_B, top_p_B))
    logits = logits_BV.reshape(-1, shape[-1]).float()
    cold = temperature_B <= 0
    t = torch.where(cold, torch.ones_like(temperature_B), temperature_B).float()
    probs = torch.softmax(logits / t[:, None], dim=-1)
    if filters is None or ((filters.k_max or filters.nucleus) and probs.device.type != "cpu"):
        # (On a GPU the sort is cheap, and its float sums keep their order: the radix select's scatter_add would not.)
        probs = sorted_filter(probs, top_k_B, top_p_B)
    elif filters.k_max or filters.nucleus:
        probs = _selected(probs, top_k_B, top_p_B, filters)
    if filters is None or filters.greedy:
        onehot = torch.zeros_like(probs).scatter(-1, argmax(logits)[..., None], 1.0)
        probs = torch.where(cold[:, None], onehot, probs)
    return probs.view(shape)


def sorted_filter(probs: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """Top-k and top-p over probabilities [B, V] through one sort of the vocabulary, renormalised."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)
    k = torch.where(top_k_B > 0, top_k_B, torch.full_like(top_k_B, probs.shape[-1]))
    keep = rank[None, :] < k[:, None]
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is below top_p
    # (top_p 1 keeps every token, also those after a mass that rounds to 1).
    before = sorted_p.cumsum(-1) - sorted_p
    keep &= (before < top_p_B[:, None].float()) | (top_p_B >= 1)[:, None]
    keep[:, 0] = True
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return probs / probs.sum(-1, keepdim=True)


def _selected(probs: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor, filters: Filters) -> torch.Tensor:
    """``sorted_filter`` without the sort (``filtered_probs``)."""
    B, V = probs.shape
    keep = torch.ones(B, V, dtype=torch.bool, device=probs.device)
    if filters.nucleus:  # rows without top-k
        floor = nucleus_floor(probs, top_p_B)
        keep = (probs.view(torch.int32) >= floor) | (top_p_B >= 1)[:, None]
    if filters.k_max:  # rows with top-k: the same prefixes, among their k_max most likely tokens
        K = min(filters.k_max, V)
        values, index = probs.topk(K, dim=-1)
        before = values.cumsum(-1) - values
        ok = (torch.arange(K, device=probs.device) < top_k_B[:, None]) & (
            (before < top_p_B[:, None].float()) | (top_p_B >= 1)[:, None])
        ok[:, 0] = True
        ranked = torch.zeros(B, V, dtype=torch.bool, device=probs.device).scatter(-1, index, ok)
        keep = torch.where((top_k_B > 0)[:, None], ranked, keep)
    probs = torch.where(keep, probs, probs.new_zeros(()))
    return probs / probs.sum(-1, keepdim=True)


def nucleus_floor(probs: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """The smallest probability each row's nucleus keeps, as its float bits [B, 1] (int32): the probability at
    which the mass of the tokens from the most likely down first reaches ``top_p``; 0 where the row's whole mass
    stays below it (rounding), so that every token stays. Probabilities are non-negative floats, whose bits
    order as integers as the floats do: a radix select over their four bytes, high to low, each pass a
    histogram of the mass per byte value among the tokens whose higher bytes match the bytes found so far."""
    B, V = probs.shape
    order = (3, 2, 1, 0) if sys.byteorder == "little" else (0, 1, 2, 3)
    by = probs.contiguous().view(torch.uint8).view(B, V, 4)
    want = top_p_B[:, None].float().clamp(min=torch.finfo(torch.float32).tiny)  # at least the top token
    above = probs.new_zeros(B, 1)  # the mass of the tokens above the bytes found so far
    floor = torch.zeros(B, 1, dtype=torch.int32, device=probs.device)
    match = found = None
    zero = probs.new_zeros(())
    for shift, byte_at in zip((24, 16, 8, 0), order):
        byte = by[..., byte_at]
        mass = probs if match is None else torch.where(match, probs, zero)
        hist = probs.new_zeros(B, 256).scatter_add_(1, byte.long(), mass)
        desc = hist.flip(-1).cumsum(-1)  # the mass at this byte value or above, from 255 down
        reach = (above + desc) >= want
        if found is None:
            found = reach[:, -1:]
        else:  # the same tokens' mass summed in another order may fall an ulp short: then the lowest value
            reach[:, -1] = True
        j = reach.int().argmax(-1, keepdim=True)  # the first value from the top that reaches it
        b = 255 - j
        above = above + desc.gather(1, j) - hist.gather(1, b)
        floor = floor | (b.int() << shift)
        if shift:
            hit = byte == b.to(torch.uint8)
            match = hit if match is None else match & hit
    return torch.where(found, floor, torch.zeros_like(floor))


def draw(probs_BV: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from ``probs`` [..., V] (rows sum to 1): the first token whose cumulative mass passes one
    uniform draw times the row's mass, so never a token of probability 0. One random number a row: the
    exponential race it replaced (argmax p / E, E ~ Exp(1)) drew one per token, 0.9 ms for 8 rows of 49,152 on
    2 threads of an EPYC, more than the rest of a sampled SmolLM2 step's sampling."""
    cdf = probs_BV.float().cumsum(-1)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, generator=generator, device=probs_BV.device)
    at = torch.searchsorted(cdf, u * total, right=True)
    # (u * total may round up to the total: then the last token with mass, where the cumulative mass reaches it)
    return torch.minimum(at, (cdf < total).sum(-1, keepdim=True))[..., 0]


def sample(
    logits_BV: torch.Tensor,
    temperature_B: torch.Tensor,
    top_k_B: torch.Tensor,
    top_p_B: torch.Tensor,
    generator: torch.Generator | None = None,
    filters: Filters | None = None,
) -> torch.Tensor:
    """Token ids [B] (or [B, ...] from logits [B, ..., V]): a draw from the filtered distribution (``filters`` as
    ``filtered_probs`` takes them), which where temperature is 0 is the one-hot of the argmax, so that row's draw
    is its argmax."""
    return draw(filtered_probs(logits_BV, temperature_B, top_k_B, top_p_B, filters), generator)


def speculative_verify(
    p_BNV: torch.Tensor,
    q_BMV: torch.Tensor,
    drafts_BM: torch.Tensor,
    generator: torch.Generator | None = None,
    exact: bool = True,
    verified_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling over the first ``verified_B`` of M drafts (default: all M) with target rows p (M + 1
    rows: row i is the law after i drafts, so row M is the bonus row).

    Exact (``exact=True``): draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first
    rejection the next token is drawn from normalize(max(0, p_i - q_i)) and the rest is discarded; if every
    verified draft passes, the next token is drawn from the row after them (p_v: the bonus row when v = M, the
    first row when a row verifies none). The output then follows p exactly, whatever q was, as long as each d_i was
    drawn from q_i; any prefix of such drafts is verified exactly the same way. With ``exact=False`` a draft passes
    whenever it lies in p's support (the approximate "truncated verification"), and a rejection draws from p_i.
    Every row takes the same random numbers however many drafts it verifies (M uniform ones if exact, and a draw).

    Returns (accepted drafts per row [B] in 0..verified, next token [B]).
    """
    B, M = drafts_BM.shape
    dev = p_BNV.device
    p_d = p_BNV[:, :M].gather(-1, drafts_BM[..., None])[..., 0]
    if exact:
        q_d = q_BMV.gather(-1, drafts_BM[..., None])[..., 0]
        u = torch.rand(B, M, generator=generator, device=dev)
        passed = u * q_d < p_d  # u < p/q without dividing by q
    else:
        passed = p_d > 0
    top = torch.full((B,), M, device=dev) if verified_B is None else verified_B
    passed = passed & (torch.arange(M, device=dev) < top[:, None])
    accepted = passed.long().cumprod(-1).sum(-1)  # [B]
    rows = torch.arange(B, device=dev)
    law = p_BNV[rows, accepted]  # every verified draft passed: the row after them
    if M > 0:
        at = accepted.clamp(max=M - 1)
        p_at = p_BNV[rows, at]
        residual = (p_at - q_BMV[rows, at]).clamp(min=0) if exact else p_at
        mass = residual.sum(-1, keepdim=True)
        # p == q at that row leaves no residual mass; then p itself is the right law (it never rejects there).
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_at)
        law = torch.where((accepted < top)[:, None], residual, law)
    return accepted, draw(law, generator)
