"""The runner interface with no cache (``flare.engine.runner``): every forward recomputed from each whole
sequence on its own. Slow and obviously right: running a strategy on it and on ``CachedRunner`` and comparing is
how the caches and commits are proven exact."""

from __future__ import annotations

from collections.abc import Hashable

import torch

from flare.model import FlareModel
from flare.model.context import Rows
from flare.model.row_tree import RowTree


class ReferenceRunner:
    """The same interface with no cache: every call re-runs each whole sequence on its own."""

    def __init__(self, model: FlareModel, slots: int, capacity: int = 0) -> None:
        self.model = model
        self.seqs: list[list[int]] = [[] for _ in range(slots)]
        self.pending: torch.Tensor | None = None
        self.tree: RowTree | None = None  # the last rows forward's, where it had seeded groups
        self.forwards = 0

    def _forward(self, s: int, tail: list[int], num_clean: int) -> torch.Tensor:
        """Final hidden states of the whole sequence: committed tokens and the first num_clean tail rows are
        clean rows, the rest of the tail a noisy block."""
        full = torch.tensor([self.seqs[s] + tail], device=self.model.device)
        cache = self.model.new_cache(1)  # empty: the whole sequence is rows of this forward
        hidden = self.model.hidden_states(full, cache=cache, layout=Rows(len(self.seqs[s]) + num_clean))
        return hidden[0]

    def _zeros(self, *shape: int, last: int | None = None) -> torch.Tensor:
        """Zeros [*shape, hidden] (or [*shape, last])."""
        size = self.model.config.hidden_size if last is None else last
        return torch.zeros(*shape, size, device=self.model.device, dtype=self.model.dtype)

    def reset(self, slots: list[int]) -> None:
        for s in slots:
            self.seqs[s] = []

    def covers(self, n: int) -> int:
        return n

    def prefill(self, tokens: list[list[int]]) -> torch.Tensor:
        self.forwards += 1
        out = []
        for s, t in enumerate(tokens):
            self.seqs[s] += t
            out.append(self.model.logits(self._forward(s, [], 0)[-1]) if t
                       else self._zeros(1, last=self.model.config.vocab_size)[0])
        return torch.stack(out)

    def append(self, tokens: torch.Tensor, num_new: torch.Tensor | None = None) -> torch.Tensor:
        self.forwards += 1
        S, R = tokens.shape
        counts = [R] * S if num_new is None else num_new.tolist()
        out = self._zeros(S, R)
        for s in range(S):
            n = counts[s]
            if n:
                self.seqs[s] += tokens[s, :n].tolist()
                out[s, :n] = self._forward(s, [], 0)[-n:]
        return out

    def rows(self, tokens: torch.Tensor, num_clean, num_noisy=None, record: bool = False,
             seeds: torch.Tensor | None = None, layout_key: Hashable | None = None,
             clean_rows: int | None = None) -> torch.Tensor:
        self.pending = tokens
        self.forwards += 1
        S, R = tokens.shape
        clean = torch.as_tensor(num_clean).expand(S).tolist()
        if clean_rows is not None and max(clean) > clean_rows:  # the bound a cached commit relies on
            raise AssertionError(f"{max(clean)} clean rows, more than the plan's bound {clean_rows}")
        noisy = [R - c for c in clean] if num_noisy is None else torch.as_tensor(num_noisy).expand(S).tolist()
        out = self._zeros(S, R)
        device = tokens.device
        self.tree = None if seeds is None else RowTree.build(torch.tensor(clean, device=device),
                                                             torch.tensor(noisy, device=device), seeds)
        for s in range(S):
            n, c = clean[s] + noisy[s], clean[s]
            if not n:
                continue
            if seeds is None:
                out[s, :n] = self._forward(s, tokens[s, :n].tolist(), c)[-n:]
                continue
            # Each noisy group on its own: the committed tokens, the path to its seed (the clean prefix, or a
            # branch row after one), then the group.
            row, seed = tokens[s].tolist(), seeds[s].tolist()
            if c:
                out[s, :c] = self._forward(s, row[:c], c)[-c:]
            start = c
            while start < n:
                end = start
                while end < n and seed[end] == seed[start]:
                    end += 1
                on = self.tree.path[s, seed[start] - 1].nonzero()[:, 0].tolist() if seed[start] else []
                prefix = [row[r] for r in on]
                out[s, start:end] = self._forward(s, prefix + row[start:end], len(prefix))[-(end - start):]
                start = end
        return out

    def commit_recorded(self, n_accept: torch.Tensor, ends: torch.Tensor | None = None) -> None:
        counts = n_accept.tolist()
        for s, (n, end) in enumerate(zip(counts, [-1] * len(counts) if ends is None else ends.tolist())):
            rows = range(n) if end < 0 else self.tree.path[s, end].nonzero()[:, 0].tolist()  # (its path)
            row = self.pending[s].tolist()
            self.seqs[s] += [row[r] for r in rows]

    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(s) for s in self.seqs])

    def synced(self, lengths: list[int]) -> None:
        pass

    def prefill_rows(self, tokens: torch.Tensor, num_clean: torch.Tensor, num_noisy: torch.Tensor,
                     filled: list[int]) -> torch.Tensor:
        hidden = self.rows(tokens, num_clean, num_noisy, record=True)
        self.commit_recorded(num_clean)
        return hidden
