"""How a decoding strategy touches the model: prefill, read-only rows forwards, commits.

Each strategy is written once against this small interface. ``CachedRunner`` serves it from the persistent
caches (the real thing); ``ReferenceRunner`` recomputes every forward from the full token sequence with no cache
at all (slow, obviously right). Running a strategy on both and comparing is how the caches and commits are
proven exact.
"""

from __future__ import annotations

import torch

from flare.decoding.prompts import pad_prompts
from flare.model import CommitRecord, FlareModel
from flare.model.context import Rows


class CachedRunner:
    def __init__(self, model: FlareModel, batch: int, capacity: int) -> None:
        self.model = model
        self.cache = model.new_cache(batch, capacity=capacity)
        self.record: CommitRecord | None = None
        self.forwards = 0

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Commit the prompts (rows may be empty); return the logits after the last token of each [B, V]
        (undefined for empty rows)."""
        if max(len(p) for p in prompts) == 0:
            return torch.zeros(len(prompts), self.model.config.vocab_size, device=self.model.device)
        ids, valid = pad_prompts([p or [0] for p in prompts], self.model.device)
        valid &= torch.tensor([len(p) > 0 for p in prompts], device=valid.device)[:, None]
        hidden = self.model.hidden_states(ids, cache=self.cache, valid=valid)
        # The runner's cache starts empty, so the prompt lengths are the exact lengths: no device read needed.
        self.cache.tighten(max(len(p) for p in prompts))
        self.forwards += 1
        last = (valid.sum(1) - 1).clamp(min=0)
        return self.model.logits(hidden[torch.arange(len(prompts), device=ids.device), last])

    def rows(self, tokens: torch.Tensor, num_clean, num_noisy: int | None = None, record: bool = False):
        """Logits [B, T, V] of rows [clean x num_clean ; noisy x num_noisy ; padding] after the committed tokens
        (``num_clean`` an int or a [B] tensor); commits nothing."""
        self.record = CommitRecord.empty() if record else None
        layout = Rows(num_clean, num_noisy)
        hidden = self.model.hidden_states(tokens, cache=self.cache, layout=layout, record=self.record)
        self.forwards += 1
        return self.model.logits(hidden)

    def commit_recorded(self, n_accept: torch.Tensor) -> None:
        """Commit the first n_accept[b] clean rows of the last recorded rows forward (no forward)."""
        self.cache.commit(self.record, n_accept)
        self.record = None

    def append(self, tokens: torch.Tensor) -> torch.Tensor:
        """Commit tokens [B, T] with a causal forward; return the logits after the last one [B, V]."""
        hidden = self.model.hidden_states(tokens, cache=self.cache)
        self.forwards += 1
        return self.model.logits(hidden[:, -1])

    def sync(self, finished: torch.Tensor) -> bool:
        """The one host sync per round: whether all rows are done (and the true longest length)."""
        done, longest = torch.stack([finished.all().long(), self.cache.lengths.max()]).tolist()
        self.cache.tighten(longest)
        return bool(done)


class ReferenceRunner:
    """The same interface with no cache: every call re-runs the whole sequence, one row at a time."""

    def __init__(self, model: FlareModel, batch: int, capacity: int = 0) -> None:
        self.model = model
        self.seqs: list[list[int]] = [[] for _ in range(batch)]
        self.pending: torch.Tensor | None = None
        self.forwards = 0

    def _forward(self, b: int, tail: list[int], num_clean: int) -> torch.Tensor:
        """Logits of the whole sequence: committed tokens and the first num_clean tail rows are clean rows,
        the rest of the tail a noisy block."""
        full = torch.tensor([self.seqs[b] + tail], device=self.model.device)
        cache = self.model.new_cache(1)  # empty: the whole sequence is rows of this forward
        hidden = self.model.hidden_states(full, cache=cache, layout=Rows(len(self.seqs[b]) + num_clean))
        return self.model.logits(hidden[0])

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        self.seqs = [list(p) for p in prompts]
        self.forwards += 1
        V = self.model.config.vocab_size
        return torch.stack([
            self._forward(b, [], 0)[-1] if p else torch.zeros(V, device=self.model.device)
            for b, p in enumerate(prompts)
        ]).to(self.model.dtype)

    def rows(self, tokens: torch.Tensor, num_clean, num_noisy: int | None = None, record: bool = False):
        self.pending = tokens
        self.forwards += 1
        B, T = tokens.shape
        clean = torch.as_tensor(num_clean).expand(B).tolist()
        out = []
        for b in range(B):
            n = T if num_noisy is None else clean[b] + num_noisy
            logits = self._forward(b, tokens[b, :n].tolist(), clean[b])[-n:]
            out.append(torch.cat([logits, logits.new_zeros(T - n, logits.shape[-1])]))
        return torch.stack(out)

    def commit_recorded(self, n_accept: torch.Tensor) -> None:
        for b, n in enumerate(n_accept.tolist()):
            self.seqs[b] += self.pending[b, :n].tolist()

    def append(self, tokens: torch.Tensor) -> torch.Tensor:
        for b in range(len(self.seqs)):
            self.seqs[b] += tokens[b].tolist()
        self.forwards += 1
        return torch.stack([self._forward(b, [], 0)[-1] for b in range(len(self.seqs))])

    def sync(self, finished: torch.Tensor) -> bool:
        return bool(finished.all())
