"""Choosing the [MASK] row of the diffusion stream: a vocabulary row that encoding text never produces.

Order of preference: a token named like a mask that the tokenizer cannot emit from text; a spare embedding row
past the tokenizer's vocabulary (how Qwen3.5's released id 248,077 arises: the embedding has more rows than the
tokenizer has tokens); else a new row, which the caller must add to the model (resizing happens elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

from flare.data.tokenizers import ChatTokenizer

MASK_NAMES = ("<|mask|>", "<|MASK|>", "<mask>", "[MASK]")


@dataclass(frozen=True)
class MaskSlot:
    token_id: int
    # Embedding rows the model needs so that ``token_id`` exists (>= the model's current size).
    vocab_size: int
    # "named": a mask-named token text cannot produce; "spare": an unused row; "added": a row to add.
    how: str

    def needs_resize(self, model_vocab_size: int) -> bool:
        return self.vocab_size > model_vocab_size


def find_mask_slot(tokenizer: ChatTokenizer, model_vocab_size: int, *, pad_to_multiple_of: int = 1) -> MaskSlot:
    """Where the [MASK] embedding lives for this tokenizer and a model with ``model_vocab_size`` rows.

    With ``how == "added"`` the model must grow to ``vocab_size`` rows (rounded up to ``pad_to_multiple_of``,
    which keeps matmul shapes friendly); the new row's id is the old size.
    """
    if model_vocab_size < 1 or pad_to_multiple_of < 1:
        raise ValueError("model_vocab_size and pad_to_multiple_of must be positive")
    for name in MASK_NAMES:
        i = tokenizer.token_id(name)
        # A named token that its own string encodes to could be produced by text: not safe as [MASK].
        if i is not None and i < model_vocab_size and tokenizer.encode(name) != [i]:
            return MaskSlot(i, model_vocab_size, "named")
    used = set(tokenizer.backend.get_vocab(with_added_tokens=True).values())
    first_free = max(used) + 1
    if first_free < model_vocab_size:
        return MaskSlot(first_free, model_vocab_size, "spare")
    gap = next((i for i in range(model_vocab_size) if i not in used), None)
    if gap is not None:
        return MaskSlot(gap, model_vocab_size, "spare")
    new_id = max(model_vocab_size, first_free)
    size = -(-(new_id + 1) // pad_to_multiple_of) * pad_to_multiple_of
    return MaskSlot(new_id, size, "added")
