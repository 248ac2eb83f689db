"""How decoding touches the model: prefill, commit-all forwards, read-only rows forwards, recorded commits.

Every strategy is written once against this small interface, over a fixed set of cache slots (one per
sequence). ``CachedRunner`` serves it from the persistent caches (the real thing); ``ReferenceRunner``
(``flare.engine.reference``) recomputes every forward from the full token sequence with no cache at all (slow,
obviously right). Running a strategy on both and comparing is how the caches and commits are proven exact.
"""

from __future__ import annotations

from contextlib import contextmanager

import dataclasses
from collections.abc import Hashable

import torch

from flare.engine.compiled import decoding_forward
from flare.engine.graphed import GraphedForward, eagerly
from flare.model import CommitRecord, FlareModel
from flare.model.context import Rows
from flare.model.row_tree import RowTree
from flare.model.layers import frozen_weights


def pad_prompts(prompts: list[list[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, Tmax] right-padded with 0, valid [B, Tmax] bool)."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)  # host: filled from host lists, then one copy
    valid = torch.zeros(len(prompts), longest, dtype=torch.bool)  # host: as ids
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)  # host: as ids
        valid[i, : len(p)] = True
    return ids.to(device), valid.to(device)


# Row trees a runner keeps (a handful of layouts recur: each set of live and paused slots of a lane).
TREES_KEPT = 32
# On the CPU a prefill runs in pieces of at most this many tokens a forward (sequences x piece length, the piece
# a multiple of 64 tokens a sequence, the recurrence's chunk): a forward over more runs slower per token, its
# activations past the caches (0.75B Qwen3.5 shape, bf16, 2 threads: 8 x 1,024 tokens in one forward 150
# tokens/s, in pieces of 256 261; 1 x 1,024 268, 2 x 1,024 266, 8 x 512 250).
CPU_PREFILL_TOKENS = 2048
# A prefill whose idle slots would pad this many rows runs the filled slots apart (``CachedRunner.prefill``).
COMPACT_ROWS = 64


def prefill_piece(sequences: int, longest: int, device: torch.device) -> int:
    """Tokens a sequence per prefill forward: all of them on CUDA or where they fit ``CPU_PREFILL_TOKENS``."""
    if device.type != "cpu" or sequences * longest <= CPU_PREFILL_TOKENS:
        return longest
    return max(64, CPU_PREFILL_TOKENS // sequences // 64 * 64)


class CachedRunner:
    """Every call takes rows for the first n slots (n <= the slot count): a forward over fewer slots than the
    cache holds runs on a narrowed view of it, so idle slots past the last busy one cost nothing."""

    def __init__(self, model: FlareModel, slots: int, capacity: int) -> None:
        self.model = model
        self.cache = model.new_cache(slots, capacity=capacity)
        self.hidden_states = decoding_forward(model)  # the model's, compiled where FLARE_COMPILE asks
        self.record: CommitRecord | None = None
        self.forwards = 0
        # Each slot's committed length where the host knows it (None: only the device does, until the next
        # sync): a forward over slots that all have the same known length needs no per-row positions or masks.
        self.known: list[int | None] = [0] * slots
        self.trees: dict[Hashable, RowTree] = {}  # row trees by layout key (``rows``)

    def covers(self, n: int) -> int:
        """Slots a step's forward covers for its first ``n`` busy ones: where forwards replay graphs (kept per batch
        size), ``n`` rounded up to a power of two, so that a server's slots need a graph for each of log2(slots) + 1
        sizes rather than each count; else ``n``."""
        if not isinstance(self.hidden_states, GraphedForward):
            return n
        return min(1 << (n - 1).bit_length(), self.cache.batch_size)

    def _run(self, n: int, rows: int, forward, whole: bool = False):
        """``forward(cache)`` on the first n slots' cache, with weight-derived values kept between calls.
        ``whole``: a causal forward, which reads and writes the recurrent states whole: their kept commits are
        written first (a narrowed cache cannot write them, ``ModelCache.settle``)."""
        with frozen_weights():
            cache = self.cache
            if whole:
                cache.settle()
            if n < cache.batch_size:
                cache.reserve(rows)
                cache = cache.narrow(n)
            same = set(self.known[:n])
            if len(same) == 1 and None not in same:
                cache.bound, cache.bound_exact = same.pop(), True
            out = forward(cache)
            if cache is not self.cache:
                self.cache.absorb(cache)
            return out

    def _advanced(self, n: int, by: list[int] | None) -> None:
        """Slots below n committed ``by[s]`` more tokens (None: counts only the device knows)."""
        for s in range(n):
            k = self.known[s]
            self.known[s] = None if by is None or k is None else k + by[s]

    def reset(self, slots: list[int]) -> None:
        """Empty the caches of ``slots`` (handed to new sequences)."""
        self.cache.reset(slots)
        for s in slots:
            self.known[s] = 0

    def restart(self) -> None:
        """As new: every slot empty, no forward counted (its tensors, and the graphs over them, kept)."""
        self.reset(list(range(self.cache.batch_size)))
        self.cache.bound, self.cache.bound_exact = 0, True
        self.record, self.forwards = None, 0

    def prefill(self, tokens: list[list[int]]) -> torch.Tensor:
        """Commit ``tokens[s]`` to slot s (an empty list leaves the slot untouched); return the logits after the
        last token of each slot [S, V] (undefined for empty rows). Long prefills on the CPU run in pieces
        (``prefill_piece``), each continuing the caches as a decode forward does; counted as one forward. Where
        the slots left out would pad ``COMPACT_ROWS`` rows or more (a prompt admitted beside running sequences),
        the filled slots run as a cache of their own (``ModelCache.take``)."""
        n = len(tokens)
        filled = [s for s, t in enumerate(tokens) if t]
        longest = max((len(t) for t in tokens), default=0)
        if filled and self.runs_apart((n - len(filled)) * longest):
            return self._prefill_apart(tokens, filled, longest)
        with eagerly(self.hidden_states):
            return self._prefill(tokens, n)

    def _prefill(self, tokens: list[list[int]], n: int) -> torch.Tensor:
        ids, valid = pad_prompts([t or [0] for t in tokens], self.model.device)
        valid &= torch.tensor([len(t) > 0 for t in tokens], device=valid.device)[:, None]
        last = (valid.sum(1) - 1).clamp(min=0)
        rows = torch.arange(n, device=ids.device)
        piece = prefill_piece(n, ids.shape[1], ids.device)
        final = None
        for start in range(0, ids.shape[1], piece):
            part, part_valid = ids[:, start:start + piece], valid[:, start:start + piece]
            hidden = self._run(n, part.shape[1], lambda cache: self.hidden_states(part, cache=cache, valid=part_valid),
                               whole=True)
            self._advanced(n, [min(max(len(t) - start, 0), part.shape[1]) for t in tokens])
            at = hidden[rows, (last - start).clamp(0, part.shape[1] - 1)]  # each slot's last row, where in here
            here = (last >= start) & (last < start + part.shape[1])
            final = at if final is None else torch.where(here[:, None], at, final)
        self.forwards += 1
        return self.model.logits(final)

    def _prefill_apart(self, tokens: list[list[int]], filled: list[int], longest: int) -> torch.Tensor:
        with self.apart(filled, longest):
            logits = self.prefill([tokens[s] for s in filled])
        return _spread(logits, filled, len(tokens))

    def prefill_rows(self, tokens: torch.Tensor, num_clean: torch.Tensor, num_noisy: torch.Tensor,
                     filled: list[int]) -> torch.Tensor:
        """A drafting prefill: a rows forward over tokens [n, R] whose clean rows are all committed; the slots
        not in ``filled`` take no part (run ``apart`` where they would pad ``COMPACT_ROWS`` rows or more).
        Returns each slot's rows' hidden states [n, R, E]."""
        n, R = tokens.shape
        if len(filled) < n and self.runs_apart((n - len(filled)) * R):
            idx = torch.tensor(filled, device=tokens.device)
            with self.apart(filled, R):
                hidden = self.prefill_rows(tokens[idx], num_clean[idx], num_noisy[idx], list(range(len(filled))))
            return _spread(hidden, filled, n)
        with eagerly(self.hidden_states):
            hidden = self.rows(tokens, num_clean, num_noisy, record=True)
            self.commit_recorded(num_clean)
        return hidden

    def runs_apart(self, idle_rows: int) -> bool:
        """Whether a prefill whose idle slots would pad ``idle_rows`` rows runs its slots ``apart`` (eagerly
        only: graphed and compiled forwards keep to their caches)."""
        return idle_rows >= COMPACT_ROWS and self.hidden_states == self.model.hidden_states

    @contextmanager
    def apart(self, slots: list[int], rows: int):
        """Forwards inside run on ``slots`` alone, as the slots 0 .. k-1 of a cache of their own (in that order,
        ``ModelCache.take``) with room for ``rows`` more tokens; written back after."""
        full, known = self.cache, self.known
        full.reserve(rows)  # so that what is written apart fits back
        self.cache, self.known = full.take(slots, full.bound + rows), [known[s] for s in slots]
        try:
            yield
        finally:
            sub, part, self.cache, self.known = self.cache, self.known, full, known
        full.put(slots, sub)
        for s, length in zip(slots, part):
            self.known[s] = length

    def append(self, tokens: torch.Tensor, num_new: torch.Tensor | None = None) -> torch.Tensor:
        """Commit the first ``num_new[s]`` of tokens [S, R] to each slot (all of them when None) with a causal
        forward; return each row's final hidden state [S, R, E] (the lanes take logits of the rows they read)."""
        valid = None
        if num_new is not None:
            valid = torch.arange(tokens.shape[1], device=tokens.device) < num_new[:, None]
        hidden = self._run(tokens.shape[0], tokens.shape[1],
                           lambda cache: self.hidden_states(tokens, cache=cache, valid=valid), whole=True)
        self._advanced(tokens.shape[0], None if num_new is not None else [tokens.shape[1]] * tokens.shape[0])
        self.forwards += 1
        return hidden

    def rows(self, tokens: torch.Tensor, num_clean, num_noisy=None, record: bool = False,
             seeds: torch.Tensor | None = None, layout_key: Hashable | None = None,
             clean_rows: int | None = None) -> torch.Tensor:
        """Final hidden states [S, R, E] of rows [clean x num_clean ; noisy x num_noisy ; padding] after the
        committed tokens (counts: ints or [S] tensors; ``seeds``: noisy groups, see ``flare.model.context.Rows``);
        commits nothing. ``layout_key``: a host-side name of these counts and seeds (equal keys, equal layouts):
        the row tree of a seeded layout is then built once and reused. ``clean_rows``: at most this many clean
        rows per slot (host side), so a commit of the recorded forward keeps no more."""
        self.record = CommitRecord.empty() if record else None
        layout = Rows(num_clean, num_noisy, seeds)
        if seeds is not None and layout_key is not None:
            key = (layout_key, tuple(tokens.shape))
            if key not in self.trees:
                if len(self.trees) >= TREES_KEPT:
                    self.trees.clear()
                S, R = tokens.shape
                self.trees[key] = RowTree.build(*layout.counts(S, R, tokens.device), seeds)
            layout = dataclasses.replace(layout, tree=self.trees[key])
        hidden = self._run(tokens.shape[0], tokens.shape[1], lambda cache: self.hidden_states(
            tokens, cache=cache, layout=layout, record=self.record))
        if self.record is not None and clean_rows is not None:
            self.record.rows = min(self.record.rows, clean_rows)
        self.forwards += 1
        return hidden

    def commit_recorded(self, n_accept: torch.Tensor, ends: torch.Tensor | None = None) -> None:
        """Commit the first n_accept[s] clean rows of the last recorded rows forward (no forward); ``ends``: see
        ``ModelCache.commit``."""
        if self.cache.pending_room() < self.record.rows:
            self.cache.settle()  # before narrowing: the kept commits of slots past the busy ones are written too
        self._run(n_accept.shape[0], 0, lambda cache: cache.commit(self.record, n_accept, ends))
        self._advanced(n_accept.shape[0], None)
        self.record = None

    def lengths(self) -> torch.Tensor:
        """Every slot's committed length [S] on the device, read in the caller's one sync per step."""
        return self.cache.lengths

    def synced(self, lengths: list[int]) -> None:
        """The host values of ``lengths()``."""
        self.known = list(lengths)
        self.cache.tighten(max(lengths), min(lengths))


def _spread(x: torch.Tensor, slots: list[int], n: int) -> torch.Tensor:
    """Rows [k, ...] of ``slots`` as rows of n slots (zeros elsewhere)."""
    idx = torch.tensor(slots, device=x.device)
    return x.new_zeros(n, *x.shape[1:]).index_copy_(0, idx, x)
