"""When drafting pays: AR-Trust's drafting rounds against plain causal steps, on the wall clock.

A drafting round costs more than a causal step (N-1 draft rows and N-1 MASK rows per sequence) and pays only when
enough drafts are accepted; how much more it costs depends on the model, the batch and the machine (on a CPU
from 1.2x to 2.2x, benchmarks/README.md). For a lane whose sequences are all greedy, whose tokens are the causal
ones whatever kind of round produced them, the pacer times each round from one plan to the next, keeps the
seconds per committed token of each kind (decayed sums of seconds and of tokens, so a round that commits more
weighs more), and runs the fastest kind, trying the others in turn for a few rounds now and then: a trial that
confirms the fastest kind doubles the rounds until the next one (up to ``LONGEST``), any switch brings them back
to ``EVERY``, so a clear winner costs few trials and a close race is watched closely. The kinds are full drafting
rounds, short ones (half the drafts and MASK rows: where rows cost, as at a larger batch of a real model, they
can commit faster) and causal steps. The first round after a switch is not timed: a drafting stint starts with a
cold round (one token, no drafts to verify) whose cost is paid once per switch, not per round. Sampled sequences
are not paced: their random draws would then depend on the clock (they keep the per-sequence pause,
``ArTrustOptions.pause``, which depends on their own verdicts only).
"""

from __future__ import annotations

import time

DRAFT, SHORT, CAUSAL = "draft", "short", "causal"


class Pacer:
    TRIAL = 3  # rounds of another kind per trial (the first untimed)
    FIRST = 8  # rounds of the first kind before each kind not yet tried gets its first trial
    EVERY = 16  # rounds of the faster kind between trials, at first and after a switch
    LONGEST = 256  # the most rounds between trials, after trials that kept confirming the faster kind
    KEEP = 0.8  # of the sums per timed round of the same kind

    def __init__(self, kinds: tuple[str, ...] = (DRAFT, CAUSAL)) -> None:
        self.kinds = kinds
        self.sums: dict[str, list[float]] = {k: [0.0, 0.0] for k in kinds}  # seconds, tokens
        self.best = kinds[0]
        self.trial_left = 0
        self.trying = self.best
        self.turn = 0  # which of the other kinds the next trial tries, in turn
        self.since = 0
        self.gap = self.EVERY  # rounds between trials
        self.trialled = False  # a trial ran since the last comparison
        self.open: tuple[str, float] | None = None  # the timed round in flight: its kind and start
        self.last: str | None = None

    def rate(self, kind: str) -> float | None:
        """Seconds per committed token of ``kind`` (None before a timed round of it)."""
        seconds, tokens = self.sums[kind]
        return seconds / tokens if tokens else None

    def skip(self) -> None:
        """Do not time the round in flight (an admission's prefill ran inside it, or another pacer ran it)."""
        self.open = None

    def next(self, tokens: int | None) -> str:
        """The kind of the next round; ``tokens``: what the last round committed (None: unknown)."""
        now = time.perf_counter()
        if self.open is not None and tokens:
            kind, start = self.open
            sums = self.sums[kind]
            sums[0] = self.KEEP * sums[0] + (now - start)
            sums[1] = self.KEEP * sums[1] + tokens
        if self.trial_left:
            self.trial_left -= 1
            kind = self.trying
        else:
            rates = {k: self.rate(k) for k in self.kinds}
            known = [k for k in self.kinds if rates[k] is not None]
            fastest = min(known, key=lambda k: rates[k]) if known else self.best
            switch = rates[self.best] is not None and fastest != self.best
            if switch:  # conditions changed: watch closely
                self.best = fastest
                self.gap = self.EVERY
            elif self.trialled:  # a trial confirmed the faster kind: the next one later
                self.gap = min(2 * self.gap, self.LONGEST)
            self.trialled = False
            self.since += 1
            others = [k for k in self.kinds if k != self.best]
            untried = [k for k in others if rates[k] is None]
            if self.since > (self.FIRST if untried else self.gap):
                self.trying = untried[0] if untried else others[self.turn % len(others)]
                self.turn += not untried
                self.since, self.trial_left, self.trialled = 0, self.TRIAL - 1, True
                kind = self.trying
            else:
                kind = self.best
        self.open = (kind, now) if kind == self.last else None
        self.last = kind
        return kind
