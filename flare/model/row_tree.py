"""Inference rows as a tree: a clean chain, and noisy groups each seeded after its own clean prefix.

AR-Trust drafting from every acceptance point (method §3, our extension) runs, in one forward, a MASK group
after ``pending, d_1 .. d_k`` for every k. Each group is a training noisy block seeded at that clean boundary:
its rows see the clean prefix and the whole group, continue the recurrence from the state after the prefix,
and read the group-end state. Described per row:

- ``parent``: the row before it on its path (-1: the committed context); clean row r -> r - 1, a group's first
  row -> its prefix's last row, other group rows -> the row before;
- ``reads``: the row whose state and visibility it takes: itself for clean and padding rows, its group's last
  row for a noisy row;
- ``path`` [B, T, T]: path[b, i, j] when j is i or an ancestor of i;
- ``depth``: ancestors on the path, i.e. the row's position after the committed tokens.

A single noisy block right after the clean rows (every other rows forward) is the tree whose only group is
seeded after all clean rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from flare import masks
from flare.ops.conv import tree_windows


@dataclass
class RowTree:
    parent: torch.Tensor  # [B, T] long
    reads: torch.Tensor  # [B, T] long
    path: torch.Tensor  # [B, T, T] bool
    depth: torch.Tensor  # [B, T] long
    real: torch.Tensor  # [B, T] bool: clean or noisy (not padding)
    # What the layout alone determines, built on first use: a tree reused by forwards of the same layout (the
    # runner keeps it under a host-side key) builds it once.
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, num_clean: torch.Tensor, num_noisy: torch.Tensor, seeds: torch.Tensor) -> "RowTree":
        """Rows [clean x num_clean ; noisy x num_noisy ; padding]; ``seeds`` [B, T]: for each noisy row, the
        clean prefix its group follows. Consecutive noisy rows with the same seed form one group."""
        B, T = seeds.shape
        r = torch.arange(T, device=seeds.device)
        clean = r < num_clean[:, None]
        real = r < (num_clean + num_noisy)[:, None]
        noisy = real & ~clean
        prev_noisy = F.pad(noisy[:, :-1], (1, 0), value=False)
        first = noisy & (~prev_noisy | (seeds != F.pad(seeds[:, :-1], (1, 0), value=-1)))
        parent = torch.where(first, seeds - 1, r - 1)
        next_first = F.pad(first[:, 1:], (0, 1), value=True)
        last = noisy & (next_first | ~F.pad(noisy[:, 1:], (0, 1), value=False))
        # A noisy row reads the first group end at or after it (a reversed running minimum).
        ends = torch.where(last, r, T).flip(1).cummin(1).values.flip(1)
        reads = torch.where(noisy, ends, r)
        # Ancestors by doubling: P <- P or P @ P, from "self or parent".
        step = F.one_hot(parent.clamp(min=0), T).bool() & (parent >= 0)[..., None]
        path = step | torch.eye(T, dtype=torch.bool, device=seeds.device)
        hops = 1
        while hops < T:
            path = (path.float() @ path.float()) > 0
            hops *= 2
        return cls(parent, reads, path, path.sum(-1) - 1, real)

    def _once(self, key, build):
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def sees(self) -> torch.Tensor:
        """[B, T, T]: row i may attend to row j (the path of the row it reads, real rows only)."""
        return self._once("sees", lambda: self.path.gather(1, self.reads[..., None].expand_as(self.path))
                          & self.real[:, None, :])

    def own_mask(self) -> torch.Tensor:
        """[B, 1, T, T]: what each row sees of the forward's own rows (``masks.inference_tree`` after an empty
        cache); ``masks.after_committed`` widens it when every sequence has the same committed length."""
        B, T = self.real.shape
        return self._once("own", lambda: masks.materialize(
            masks.inference_tree(torch.zeros(B, dtype=torch.long, device=self.real.device), self.sees(),
                                 self.real), B, T, T, self.real.device))

    def windows(self, K: int) -> torch.Tensor:
        """Each row's short-conv window of width K [B, T, K] (``flare.ops.conv.tree_windows``)."""
        return self._once(("windows", K), lambda: tree_windows(self.parent, K))
