"""PackedBatch: what the data pipeline hands to a training objective."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    """Rows of packed documents.

    ``loss_mask[b, i]`` is True where token i is supervised (assistant content and its end token): it is the
    target of an AR term, and the position may be masked in the noisy stream. ``doc_ids`` numbers the documents
    of a row (contiguous runs); under the FLARE objective every document starts at a multiple of the block size.
    """

    input_ids: torch.Tensor  # [B, L] int64
    loss_mask: torch.Tensor  # [B, L] bool
    doc_ids: torch.Tensor  # [B, L] int64

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got {tuple(self.input_ids.shape)}")
        for name in ("loss_mask", "doc_ids"):
            t = getattr(self, name)
            if t.shape != self.input_ids.shape:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(self.input_ids.shape)}"
                )
        if self.loss_mask.dtype != torch.bool:
            raise ValueError(f"loss_mask must be bool, got {self.loss_mask.dtype}")

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.loss_mask.to(device), self.doc_ids.to(device))

    @property
    def same_doc_next(self) -> torch.Tensor:
        """[B, L] bool: position i has a successor i+1 in the same document."""
        nxt = torch.zeros_like(self.loss_mask)
        nxt[:, :-1] = self.doc_ids[:, 1:] == self.doc_ids[:, :-1]
        return nxt

    @property
    def next_target_ok(self) -> torch.Tensor:
        """[B, L] bool: row i may be trained to predict token i+1 (same document, supervised)."""
        ok = self.same_doc_next.clone()
        ok[:, :-1] &= self.loss_mask[:, 1:]
        return ok
