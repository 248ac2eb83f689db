"""When drafting pays: AR-Trust's drafting rounds against plain causal steps, on the wall clock.

A drafting round costs more than a causal step (N-1 draft rows and N-1 MASK rows per sequence) and pays only when
enough drafts are accepted; how much more it costs depends on the model, the batch and the machine (on a CPU
from 1.2x to 2.2x, benchmarks/README.md). For a lane whose sequences are all greedy, whose tokens are the causal
ones whatever kind of round produced them, the pacer times each round from one plan to the next, keeps the
seconds per committed token of each kind (decayed sums of seconds and of tokens, so a round that commits more
weighs more), and runs the faster kind, trying the other for a few rounds now and then: a trial that confirms the
faster kind doubles the rounds until the next one (up to ``LONGEST``), any switch brings them back to ``EVERY``,
so a clear winner costs few trials and a close race is watched closely. The first round after
a switch is not timed: a drafting stint starts with a cold round (one token, no drafts to verify) whose cost is
paid once per switch, not per round. Sampled sequences are not paced: their random draws would then depend on the
clock (they keep the per-sequence pause, ``ArTrustOptions.pause``, which depends on their own verdicts only).
"""

from __future__ import annotations

import time

DRAFT, CAUSAL = "draft", "causal"


class Pacer:
    TRIAL = 3  # rounds of the other kind per trial (the first untimed)
    FIRST = 8  # drafting rounds before the first causal trial
    EVERY = 16  # rounds of the faster kind between trials, at first and after a switch
    LONGEST = 256  # the most rounds between trials, after trials that kept confirming the faster kind
    KEEP = 0.8  # of the sums per timed round of the same kind

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {DRAFT: [0.0, 0.0], CAUSAL: [0.0, 0.0]}  # seconds, tokens
        self.best = DRAFT
        self.trial_left = 0
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
        """Do not time the round in flight (an admission's prefill ran inside it)."""
        self.open = None

    def next(self, tokens: int | None) -> str:
        """The kind of the next round; ``tokens``: what the last round committed (None: unknown)."""
        now = time.perf_counter()
        if self.open is not None and tokens:
            kind, start = self.open
            sums = self.sums[kind]
            sums[0] = self.KEEP * sums[0] + (now - start)
            sums[1] = self.KEEP * sums[1] + tokens
        other = CAUSAL if self.best == DRAFT else DRAFT
        if self.trial_left:
            self.trial_left -= 1
            kind = other
        else:
            mine, theirs = self.rate(self.best), self.rate(other)
            switch = theirs is not None and mine is not None and theirs < mine
            if switch:
                self.best, other = other, self.best
            if switch:  # conditions changed: watch closely
                self.gap = self.EVERY
            elif self.trialled:  # a trial confirmed the faster kind: the next one later
                self.gap = min(2 * self.gap, self.LONGEST)
            self.trialled = False
            self.since += 1
            if self.since > (self.FIRST if theirs is None else self.gap):
                self.since, self.trial_left, self.trialled = 0, self.TRIAL - 1, True
                kind = other
            else:
                kind = self.best
        self.open = (kind, now) if kind == self.last else None
        self.last = kind
        return kind
