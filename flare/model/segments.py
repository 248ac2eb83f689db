"""Documents of packed rows, unpacked into one padded segment per document (and packed back).

Recurrent layers reset their state at every document start. Rather than teach every recurrence about resets,
each document becomes a row of its own ("segment") that starts from a zero state; padding positions carry
zeros, which the gated delta rule treats as "decay 1, write 0" and so leave the state untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segments:
    index: torch.Tensor  # [S, Ls] position in the flattened [B * L] tokens (0 where padding)
    valid: torch.Tensor  # [S, Ls] bool
    positions: torch.Tensor  # [B, L] position of each token inside its document (RoPE index)
    source: torch.Tensor  # [B * L] each token's place in the flattened [S * Ls] segments (every token has one)
    batch: int
    length: int

    @classmethod
    def from_doc_ids(cls, doc_ids_BL: torch.Tensor, block_size: int = 1) -> "Segments":
        """Documents are maximal runs of equal ids in a row. With ``block_size`` > 1 every document must start
        at a multiple of it (its blocks then line up with the row's), else a ValueError."""
        if doc_ids_BL.ndim != 2 or doc_ids_BL.shape[1] == 0:
            raise ValueError(f"doc_ids must be [batch, tokens] with tokens > 0, got {tuple(doc_ids_BL.shape)}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        B, L = doc_ids_BL.shape
        device = doc_ids_BL.device
        starts = torch.ones(B, L, dtype=torch.bool, device=device)
        starts[:, 1:] = doc_ids_BL[:, 1:] != doc_ids_BL[:, :-1]
        rows, cols = starts.nonzero(as_tuple=True)
        bad = cols % block_size != 0
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"document starts must be block-aligned: row {int(rows[i])} has a document starting at position "
                f"{int(cols[i])}, not a multiple of block_size={block_size} (pad documents to a multiple of it)"
            )
        flat_start = rows * L + cols
        flat_end = torch.cat([flat_start[1:], flat_start.new_tensor([B * L])])
        # A segment never runs past the end of its row.
        flat_end = torch.minimum(flat_end, (rows + 1) * L)
        seg_len = flat_end - flat_start
        longest = int(seg_len.max())
        longest = -(-longest // block_size) * block_size
        offs = torch.arange(longest, device=device)
        valid = offs[None, :] < seg_len[:, None]
        index = torch.where(valid, flat_start[:, None] + offs[None, :], torch.zeros_like(valid, dtype=torch.long))
        positions = torch.zeros(B * L, dtype=torch.long, device=device)
        dest = index[valid]
        positions[dest] = offs.expand_as(index)[valid]
        source = torch.empty(B * L, dtype=torch.long, device=device)
        source[dest] = torch.arange(valid.numel(), device=device).view_as(valid)[valid]
        return cls(index, valid, positions.view(B, L), source, B, L)

    @property
    def count(self) -> int:
        return self.index.shape[0]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [S, Ls, ...], zeros at padding."""
        flat = x.reshape(self.batch * self.length, *x.shape[2:])
        seg = flat[self.index]
        mask = self.valid.view(*self.valid.shape, *([1] * (x.ndim - 2)))
        return seg * mask.to(seg.dtype) if seg.is_floating_point() else seg.masked_fill(~mask, 0)

    def pack(self, y: torch.Tensor) -> torch.Tensor:
        """[S, Ls, ...] -> [B, L, ...] (padding dropped): one gather, sized and indexed without a host read."""
        flat = y.reshape(y.shape[0] * y.shape[1], *y.shape[2:])
        return flat.index_select(0, self.source).view(self.batch, self.length, *y.shape[2:])
