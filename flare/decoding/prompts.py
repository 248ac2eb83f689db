"""Turning a list of prompts (token ids) into a right-padded batch, with the checks every mode needs."""

from __future__ import annotations

import warnings

import torch


def check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: at least one token is needed")
        for t in p:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
                raise ValueError(f"prompt {i}: token id {t!r} is outside the vocabulary [0, {vocab_size})")


def pad_prompts(prompts: list[list[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, Tmax] right-padded with 0, valid [B, Tmax] bool)."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    valid = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        valid[i, : len(p)] = True
    return ids.to(device), valid.to(device)


def stop_ids(params_stop: list[int], eos: list[int], ignore_eos: bool) -> list[int]:
    return sorted(set(params_stop) | (set() if ignore_eos else set(eos)))


def require_mask(model, mode: str, mask_rows: int | None = None) -> int:
    """The model's [MASK] id, or a clear error for an AR checkpoint asked for a parallel mode. Warns when the
    mode runs more MASK rows in a row (``mask_rows``) than the checkpoint's training noisy block: those rows'
    predictions were never trained, whatever the decoder does with them (method §3)."""
    mask_id = model.config.mask_token_id
    trained = model.config.block_size
    if mask_id is not None and trained is not None and mask_rows is not None and mask_rows > trained:
        warnings.warn(
            f"mode {mode!r} runs {mask_rows} MASK rows in a row, but this checkpoint was trained on noisy blocks "
            f"of {trained} (config.json flare.block_size): predictions past that are untrained, so expect poor "
            f"drafts or accuracy; choose a block with at most {trained} MASK rows", stacklevel=3)
    if mask_id is None:
        raise ValueError(
            f"mode {mode!r} needs a FLARE checkpoint with a mask token (config.json 'flare.mask_token_id'); "
            "this is a plain AR checkpoint: decode it with mode 'causal', or convert it with `flare convert`"
        )
    return mask_id
