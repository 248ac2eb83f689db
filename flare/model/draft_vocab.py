"""AR-Trust's draft vocabulary: the MASK rows' LM head over a shortlist of the vocabulary.

A draft is only a proposal: the verify rows, which always read the whole vocabulary, accept it where the target
law agrees (greedy: where it is the argmax; sampled: speculative sampling against the proposal law the draft was
drawn from), so decoding is exact whatever the drafts are, and a token outside the shortlist is simply never
proposed. The LM head costs rows x vocabulary, and a drafting round has more MASK rows than verify rows (a group
per acceptance point: N x (N - 1) against N), so on a vocabulary of a quarter of a million tokens the MASK rows'
head is a large part of a round (an AVX-512-BF16 EPYC, 2 threads, bf16, the LM head and argmax over 248,320 x
1,024: 1 row 18 ms, 20 rows 38 ms, 72 rows 129 ms; over the first 32,768 ids 1.7, 5.3 and 15.6 ms).

The shortlist is the first ``k`` token ids with the end tokens added and [MASK] left out: byte-level BPE
vocabularies (Qwen, Llama, SmolLM2) number their tokens in merge order, the most frequent merges first, roughly
(the SmolLM2 recipe's transfer answers: ids below 8,192 / 16,384 / 32,768 are 97.0 / 97.6 / 99.7% of the tokens
in SmolLM2's tokenizer; in Qwen3.5's, English prose, Python and those answers are 92-95% below 32,768 and
98-99.8% below 65,536).
"""

from __future__ import annotations

import torch

from flare.model.layers import derived, weights_frozen
from flare.model.packed_linear import pack, packed_linear
from flare.ops.precision import faking
from flare.ops.sampling import argmax


def draft_ids(config, vocab: int, k: int, device=None) -> torch.Tensor:
    """The shortlist's token ids, ascending: ids below ``k`` and the end tokens, without [MASK]."""
    keep = torch.zeros(vocab, dtype=torch.bool, device=device)
    keep[:k] = True
    keep[[i for i in config.eos_token_ids if 0 <= i < vocab]] = True
    if config.mask_token_id is not None:
        keep[config.mask_token_id] = False
    return keep.nonzero()[:, 0]


def _head(weight: torch.Tensor, config, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    ids = draft_ids(config, weight.shape[0], k, weight.device)
    rows = weight.detach().index_select(0, ids)
    return ids, rows, pack(rows) if weights_frozen() and not faking() else None


def draft_logits(model, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head of ``hidden`` [..., E] over the shortlist of ``k``: (logits [..., K], their token ids [K]).
    Inside ``frozen_weights()`` the head's rows are gathered (and packed for oneDNN) once."""
    weight = model.lm_head.weight
    ids, rows, packed = derived(model.lm_head, "draft_head", lambda w: _head(w, model.config, k), weight, key=(k,))
    same = hidden.dtype == rows.dtype
    return packed_linear(hidden, rows if same else rows.to(hidden.dtype), None, packed if same else None), ids


def draft_picks(model, hidden: torch.Tensor, k: int) -> torch.Tensor:
    """The greedy draft of each row of ``hidden`` among the shortlist: token ids [...]."""
    logits, ids = draft_logits(model, hidden, k)
    return ids[argmax(logits)]


def draft_law_logits(model, hidden: torch.Tensor, k: int) -> torch.Tensor:
    """The shortlist's logits spread over the whole vocabulary [..., V], -inf at every other token."""
    logits, ids = draft_logits(model, hidden, k)
    full = logits.new_full((*logits.shape[:-1], model.lm_head.weight.shape[0]), float("-inf"))
    return full.index_copy_(-1, ids, logits)
