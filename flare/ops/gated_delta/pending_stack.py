"""The kept commits of every recurrent layer of a model in one tensor each, so a commit is a few ops, not per layer.

Each layer keeps its commits as a low-rank update of its state (``pending.py``). Added layer by layer, a commit
costs about ten small ops a layer: on a Qwen3.5-0.8B-shaped model (18 recurrent layers) some 270 dispatches
a round, a few percent of a batch-1 verify round on a CPU. The layers' recurrent states share one shape, so their
updates live here as ``[L, B, H, ...]`` tensors, each layer's ``PendingCommits`` a view of its index, and a commit
of all layers at once (``add``) is as many ops as one layer's. A layer's own methods (read, settle, clear) work on
its views as before.
"""

from __future__ import annotations

import torch

from flare.ops import precision
from flare.ops.gated_delta.pending import TINY, PendingCommits, kept_rows


class PendingStack:
    """``scale`` [L, B, H, 1, 1], ``k`` [L, B, H, R, Dk], ``u`` [L, B, H, R, Dv]; ``views[i]`` is layer i's
    ``PendingCommits`` over index i of them."""

    def __init__(self, scale: torch.Tensor, k: torch.Tensor, u: torch.Tensor, views: list[PendingCommits]) -> None:
        self.scale, self.k, self.u, self.views = scale, k, u, views

    @classmethod
    def empty(cls, states: list[torch.Tensor], rows: int | None = None) -> "PendingStack | None":
        """Nothing kept yet for the layers with these recurrent states [B, H, Dk, Dv] (one shape and dtype), room
        for ``rows`` (default ``kept_rows``); None where there is no room: every commit is written at once."""
        if not states:
            return None
        first = states[0]
        if any(s.shape != first.shape or s.dtype != first.dtype or s.device != first.device for s in states):
            raise ValueError("stacked commits need recurrent states of one shape, dtype and device")
        rows = kept_rows(first) if rows is None else rows
        if rows == 0:
            return None
        L, (B, H, Dk, Dv) = len(states), first.shape
        scale = first.new_ones(L, B, H, 1, 1)
        k, u = first.new_zeros(L, B, H, rows, Dk), first.new_zeros(L, B, H, rows, Dv)
        return cls(scale, k, u, [PendingCommits(scale[i], k[i], u[i]) for i in range(L)])

    def holds(self, pendings: list[PendingCommits]) -> bool:
        """Whether these are this stack's views, in order (a caller that replaced a layer's update commits layer
        by layer)."""
        return len(pendings) == len(self.views) and all(p is v for p, v in zip(pendings, self.views))

    @property
    def room(self) -> int:
        return self.views[0].room

    def add(self, decay: torch.Tensor, k: torch.Tensor, u: torch.Tensor) -> None:
        """Commit ``S <- decay * S + k^T u`` in every layer: ``decay`` [L, B, H, 1, 1], ``k`` [L, B, H, T, Dk],
        ``u`` [L, B, H, T, Dv] (``PendingCommits.add`` for all at once)."""
        T, used = k.shape[3], self.views[0].used
        if T > self.room:
            raise RuntimeError(f"{T} rows do not fit the {self.room} left: settle the states first")
        self.scale.mul_(decay)
        if used:
            self.k[:, :, :, :used].mul_(decay)
        self.k[:, :, :, used:used + T] = k
        self.u[:, :, :, used:used + T] = u
        if not precision.DENORMALS_FLUSHED[0]:  # (as PendingCommits.add)
            kept = self.k[:, :, :, :used + T]
            kept.masked_fill_(kept.abs() < TINY, 0.0)
            self.scale.masked_fill_(self.scale < TINY, 0.0)
        for view in self.views:
            view.used, view.span = used + T, self.k.shape[1]

    def narrow(self, n: int) -> "PendingStack":
        """The first ``n`` sequences of every layer, as views (``PendingCommits.narrow``)."""
        return PendingStack(self.scale[:, :n], self.k[:, :n], self.u[:, :n], [v.narrow(n) for v in self.views])

    def clear(self, rows: torch.Tensor) -> None:
        """Forget the kept commits of sequences ``rows`` in every layer (``PendingCommits.clear``)."""
        self.scale.index_fill_(1, rows, 1.0)
        self.k.index_fill_(1, rows, 0.0)

    def clone(self) -> "PendingStack":
        scale, k, u = self.scale.clone(), self.k.clone(), self.u.clone()
        return PendingStack(scale, k, u, [PendingCommits(scale[i], k[i], u[i], v.used, v.whole, v.span)
                                          for i, v in enumerate(self.views)])
