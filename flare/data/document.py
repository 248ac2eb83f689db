"""Document: one rendered conversation as token ids and its label mask, before packing."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Document:
    """``input_ids[i]`` is supervised (a training target) iff ``loss_mask[i]``; both of length T."""

    input_ids: list[int]
    loss_mask: list[bool]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"input_ids has {len(self.input_ids)} tokens but loss_mask has {len(self.loss_mask)}")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(self.loss_mask)
