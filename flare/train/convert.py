"""`flare convert`: an AR checkpoint -> a FLARE checkpoint, with AR behaviour unchanged.

It picks the [MASK] row (a token the tokenizer never emits: a named mask token, a spare row, or a new row),
records it in config.json ("flare": {"mask_token_id": ...}), and copies the tokenizer. A new row gets the mean
input embedding; its logit is -inf wherever flare computes logits, so causal decoding is unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flare.checkpoint import load_model, save_model
from flare.data import ChatTokenizer, find_mask_slot
from flare.model import FlareModel


def resize_vocab(model: FlareModel, vocab_size: int) -> None:
    """Grow embeddings (and an untied head) to ``vocab_size`` rows; new input rows are the mean embedding."""
    old = model.model.embed_tokens.weight
    extra = vocab_size - old.shape[0]
    if extra <= 0:
        return
    with torch.no_grad():
        rows = old.mean(0, keepdim=True).expand(extra, -1)
        model.model.embed_tokens.weight = torch.nn.Parameter(torch.cat([old, rows]))
        model.model.embed_tokens.num_embeddings = vocab_size
        if model.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        else:
            head = model.lm_head.weight
            model.lm_head.weight = torch.nn.Parameter(torch.cat([head, head.mean(0, keepdim=True).expand(extra, -1)]))
        model.lm_head.out_features = vocab_size


def convert(src: str | Path, dst: str | Path, mask_token_id: int | None = None) -> int:
    """Write the FLARE checkpoint of ``src`` to ``dst``; returns the [MASK] id."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")
    model = load_model(src)
    if model.config.mask_token_id is not None:
        raise ValueError(f"{src} is already a FLARE checkpoint (mask token {model.config.mask_token_id})")
    vocab = model.config.vocab_size
    if mask_token_id is None:
        slot = find_mask_slot(ChatTokenizer.from_dir(src), vocab)
        mask_token_id, vocab = slot.token_id, slot.vocab_size
    elif not 0 <= mask_token_id < vocab:
        raise ValueError(f"mask token id {mask_token_id} is outside the vocabulary [0, {vocab})")
    resize_vocab(model, vocab)
    model.config = model.config.with_vocab(vocab, mask_token_id)
    save_model(model, dst, tokenizer_from=src)
    return mask_token_id
