"""The blocks a two-stream training row's noisy stream holds when it does not hold every block of every view.

A noisy block is seen only by its own rows (method §2.1: noisy rows see the clean prefix and their own block),
so a block none of whose rows is scored changes no loss and no gradient. In supervised data most blocks are
prompt: nothing in them is masked, and the FLARE forward spends most of its noisy rows on them. ``active`` keeps
the blocks with at least one masked position; the noisy stream is then those blocks, in (view, block) order,
``block_size`` rows each, padded per batch row to the longest row's count (padding blocks have block -1).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class NoisyBlocks:
    view: torch.Tensor  # [B, N] each kept block's view
    block: torch.Tensor  # [B, N] each kept block's index in the row (-1: padding)
    block_size: int

    @classmethod
    def active(cls, masked_BVL: torch.Tensor, block_size: int) -> "NoisyBlocks":
        """The blocks of each row and view with at least one masked position (one host read: their count)."""
        B, V, L = masked_BVL.shape
        if L % block_size:
            raise ValueError(f"row length {L} is not a multiple of block_size {block_size}")
        nb = L // block_size
        keep = masked_BVL.view(B, V * nb, block_size).any(-1)  # [B, V * nb], (view, block) order
        counts = keep.sum(1)
        n = max(1, int(counts.max()))
        # Kept blocks first, in order: a stable sort of "not kept" puts them before the rest.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :n]
        real = torch.arange(n, device=keep.device)[None, :] < counts[:, None]
        return cls(torch.where(real, order // nb, 0), torch.where(real, order % nb, -1), block_size)

    @property
    def rows(self) -> int:
        return self.block.shape[1] * self.block_size

    def _per_row(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.block_size, dim=1)

    # The per-row tables below are read by the mask, the positions and every Gated DeltaNet layer of a forward:
    # built once per layout.
    @cached_property
    def real(self) -> torch.Tensor:
        """[B, rows] whether each noisy row belongs to a kept block (False: padding)."""
        return self._per_row(self.block >= 0)

    @cached_property
    def row_view(self) -> torch.Tensor:
        """[B, rows] each noisy row's view (-1 for padding)."""
        return torch.where(self.real, self._per_row(self.view), -1)

    @cached_property
    def row_pos(self) -> torch.Tensor:
        """[B, rows] each noisy row's position in the clean row (0 for padding)."""
        offs = torch.arange(self.block_size, device=self.block.device).repeat(self.block.shape[1])
        return torch.where(self.real, self._per_row(self.block) * self.block_size + offs, 0)

    def full_index(self, views: int, length: int) -> torch.Tensor:
        """[B, rows] each noisy row's index in the full noisy stream [V * L] (padding rows: V * L, one past it)."""
        return torch.where(self.real, self.row_view * length + self.row_pos, views * length)

    def select(self, x_BVL: torch.Tensor) -> torch.Tensor:
        """The kept rows of a per-view tensor [B, V, L, ...] -> [B, rows, ...] (padding rows: view 0, position 0)."""
        B, V, L = x_BVL.shape[:3]
        flat = x_BVL.reshape(B, V * L, *x_BVL.shape[3:])
        idx = (self.row_view.clamp(min=0) * L + self.row_pos)
        idx = idx.view(B, -1, *([1] * (x_BVL.ndim - 3))).expand(B, -1, *x_BVL.shape[3:])
        return flat.gather(1, idx)
