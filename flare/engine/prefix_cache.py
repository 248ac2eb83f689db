"""Prompt beginnings kept after their prefill, so that a later prompt that starts with one skips that part.

Chat prompts share their beginnings: a system prompt, a task's instructions, the turns before a conversation's
last one. After an admission's prefill, and when a request ends (its prompt and output: a conversation's next
turn repeats them), the engine keeps what its slot committed (the attention layers' keys and values, the Gated
DeltaNet layers' conv and recurrent states) under the tokens committed; a later prompt that starts with them has
them copied into its slot and prefills only the rest.

Which beginnings an entry serves: keys and values are per position, so for a model of attention layers only
every prefix of a kept prompt is usable (the longest one a new prompt shares with it); a recurrent state exists
only at the length it was kept at, so with Gated DeltaNet layers an entry serves prompts that start with all of
it. There a prompt that shares ``SPLIT`` or more tokens more with a kept prompt than any kept state covers has
its prefill stop at the shared length once, so that the state there is kept too (one more forward, once per new
shared beginning); the prompts after it that share it start from there. Prompts admitted together that share a
beginning nothing kept covers (a burst of requests with one system prompt) have it prefilled once: the first of
them stops there and keeps it, the others start from it (``shared_in``; one more forward for the admission).

Nothing shorter than ``MIN_TOKENS`` is kept or copied, and at least one prompt token is always prefilled (its
logits give the first token); so only entries that begin with a prompt's first ``MIN_TOKENS`` tokens can serve
it, and a lookup reads only those, the ``LOOKUP`` most recently used of them (a prompt compared with each kept
one in Python would cost an admission more the longer a server runs). Entries are dropped least recently used
first beyond ``budget`` bytes or ``MAX_ENTRIES`` entries. A prefill that continues a copied beginning computes
the same values as a whole one up to rounding (its rows run in other GEMM shapes), as a long prompt's prefill in
pieces does. ``reset`` empties it: benchmarks time each mode from an empty one. An entry is the slot's state as a
cache of one sequence (``ModelCache.take``), copied back with ``ModelCache.put``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice

from flare.model.cache import AttentionState, ModelCache

MIN_TOKENS = 16  # the shortest beginning kept or copied: below it a copy saves little of a prefill's forward
SPLIT = 16  # with recurrent layers: a prefill stops to keep a state where it shares this many more tokens
MAX_ENTRIES = 1024
LOOKUP = 64  # the most recently used entries with a prompt's start that a lookup compares it with


@dataclass
class Entry:
    tokens: tuple[int, ...]
    state: ModelCache  # of one sequence, its first len(tokens) KV slots
    bytes: int


def _common(a: tuple[int, ...], b: list[int]) -> int:
    """The length of the longest common prefix of ``a`` and ``b`` (slices compared in C, halving the span)."""
    lo, hi = 0, min(len(a), len(b))
    if tuple(b[:hi]) == a[:hi]:
        return hi
    while lo + 1 < hi:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if tuple(b[lo:mid]) == a[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    def __init__(self, budget: int, recurrent: bool) -> None:
        """``budget``: bytes of kept states; ``recurrent``: the model has recurrent layers (entries then serve
        only prompts that start with the whole of them)."""
        if budget < 0:
            raise ValueError(f"the prefix cache's budget must be >= 0 bytes, got {budget}")
        self.budget = budget
        self.recurrent = recurrent
        self.entries: OrderedDict[tuple[int, ...], Entry] = OrderedDict()
        # first MIN_TOKENS tokens -> the keys of the entries that start with them, least recently used first
        self.by_start: dict[tuple[int, ...], OrderedDict[tuple[int, ...], None]] = {}
        self.bytes = 0
        self.hits = 0  # admissions that started from a kept beginning
        self.reused = 0  # prompt tokens they did not prefill

    def reset(self) -> None:
        self.entries.clear()
        self.by_start.clear()
        self.bytes = 0

    def _drop_oldest(self) -> None:
        key, entry = self.entries.popitem(last=False)
        self.bytes -= entry.bytes
        bucket = self.by_start[key[:MIN_TOKENS]]
        del bucket[key]
        if not bucket:
            del self.by_start[key[:MIN_TOKENS]]

    def _touch(self, key: tuple[int, ...]) -> None:
        self.entries.move_to_end(key)
        self.by_start[key[:MIN_TOKENS]].move_to_end(key)

    def match(self, prompt: list[int], limit: int) -> tuple[Entry | None, int, int]:
        """The entry to start ``prompt`` from, how many of its tokens (at most ``limit``; 0: none worth it), and
        the longest beginning ``prompt`` shares with any entry (also within ``limit``)."""
        best, usable, shared = None, 0, 0
        for key in islice(reversed(self.by_start.get(tuple(prompt[:MIN_TOKENS]), {})), LOOKUP):
            entry = self.entries[key]
            common = min(_common(entry.tokens, prompt), limit)
            shared = max(shared, common)
            n = common if not self.recurrent else (len(entry.tokens) if common == len(entry.tokens) else 0)
            if n > usable:
                best, usable = entry, n
        if usable < MIN_TOKENS:
            return None, 0, shared
        return best, usable, shared

    def worth_splitting(self, usable: int, shared: int) -> bool:
        """Whether a prefill should stop at ``shared`` tokens to keep the state there (recurrent models)."""
        return self.recurrent and shared >= MIN_TOKENS and shared - usable >= SPLIT

    def shared_in(self, commits: list[list[int]], usable: list[int]) -> tuple[dict[int, int], dict[int, int]]:
        """Prompts admitted together that share a beginning no entry serves: the first of them (a leader) is
        prefilled up to it alone and kept, and the others (its followers) start from it. ``commits``: what each
        admission commits; ``usable``: the tokens each starts from anyway (``match``). A follower gains at least
        ``MIN_TOKENS`` tokens; a leader stops at the beginning it shares with its first follower (with recurrent
        layers later followers must start with all of it). Returns ({leader: tokens it stops at}, {follower:
        leader}), as indices into ``commits``."""
        cuts: dict[int, int] = {}
        leads: dict[int, int] = {}
        leaders: dict[tuple[int, ...], list[int]] = {}  # by their first MIN_TOKENS tokens
        keys = [tuple(c) for c in commits]
        for i, commit in enumerate(commits):
            group = leaders.setdefault(keys[i][:MIN_TOKENS], [])
            best, most = None, usable[i] + MIN_TOKENS - 1
            for j in group[-LOOKUP:]:  # as a lookup: the latest LOOKUP leaders with this start
                common = min(_common(keys[j], commit), len(commit) - 1, len(keys[j]) - 1)
                cut = cuts.get(j, common)
                n = (cut if common >= cut else 0) if self.recurrent else min(common, cut)
                if n > max(most, usable[j]):
                    best, most = j, n
            if best is None:
                group.append(i)
            else:
                cuts.setdefault(best, most)
                leads[i] = best
        return cuts, leads

    def keep(self, cache: ModelCache, slot: int, tokens: list[int]) -> None:
        """Keep what ``slot`` committed for ``tokens`` (its whole committed length)."""
        key = tuple(tokens)
        if len(key) < MIN_TOKENS or self.budget == 0:
            return
        if key in self.entries:
            self._touch(key)
            return
        if self.recurrent:
            cache.settle()  # the kept commits written, so that the state is the slot's whole
        state = cache.take([slot], len(key))
        size = sum(a.numel() * a.element_size() for layer in state.layers
                   for a in ((layer.k, layer.v) if isinstance(layer, AttentionState) else (layer.conv, layer.ssm)))
        if size > self.budget:
            return
        while self.entries and (self.bytes + size > self.budget or len(self.entries) >= MAX_ENTRIES):
            self._drop_oldest()
        self.entries[key] = Entry(key, state, size)
        self.by_start.setdefault(key[:MIN_TOKENS], OrderedDict())[key] = None
        self.bytes += size

    def restore(self, cache: ModelCache, slot: int, entry: Entry, n: int) -> None:
        """Copy the first ``n`` tokens' state of ``entry`` into ``slot`` (emptied before: ``ModelCache.reset``)
        and set its length to ``n``."""
        self._touch(entry.tokens)
        cache.reserve(max(n - cache.bound, 0))
        cache.put([slot], entry.state, length=n)
        self.hits += 1
        self.reused += n
