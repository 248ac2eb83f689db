"""Where two greedy decodings of one model part, and whether that place is a near-tie.

In a 16-bit dtype a verify row and a causal step run GEMMs of other shapes, which round otherwise, so greedy
AR-Trust equals greedy causal decoding up to the first place where the causal top-2 logits lie within the
dtype's tolerance (``flare.ops.precision.near_tie``); past it either token is the model's greedy choice.
"""

from __future__ import annotations

import torch

from flare.ops.precision import near_tie


def divergences(model, prompts: list[list[int]], causal_ids: list[list[int]],
                other_ids: list[list[int]]) -> list[tuple[int, bool]]:
    """For each sequence whose tokens differ from causal's: (the first differing position, whether the causal
    top-2 logits there, from one full forward of the prompt and the tokens before it, are a near-tie)."""
    out = []
    for prompt, a, b in zip(prompts, causal_ids, other_ids):
        cut = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if cut is None:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + a[:cut]], device=model.device))[0, -1]
        out.append((cut, near_tie(logits)))
    return out
