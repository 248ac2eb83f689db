"""AR-Trust's pauses: where drafting fails, a sequence of a batch that is not paced decodes causally for a while.

Two verify rounds in a row that accept nothing start a pause: for ``pause`` steps the sequence decodes causally,
one row and no MASK rows, then drafts again; each pause that ends in more failure is twice as long (up to
``GROWTH`` times). The decision uses only the sequence's own verdicts, read in the stepper's one sync, so a
request is decoded the same alone or in any batch. Every token still follows the AR law (a paused step is a
causal step). A paced batch does not pause (``flare.decoding.ar_trust``): a pause inside a stint the pacer times
as drafting would make drafting look cheaper (demo model, one sequence: 12% of its drafting rounds).
"""

from __future__ import annotations

# The longest pause, in multiples of ``pause``.
GROWTH = 16


class Pauses:
    def __init__(self, slots: int, pause: int) -> None:
        self.pause = pause
        # Per slot (host side): causal steps left, verify rounds in a row that accepted nothing, the next pause.
        self.left, self.misses, self.next = [0] * slots, [0] * slots, [pause] * slots

    def reset(self, slots: list[int]) -> None:
        """New sequences in ``slots``."""
        for slot in slots:
            self.left[slot], self.misses[slot], self.next[slot] = 0, 0, self.pause

    def take(self, live: list[int]) -> list[int]:
        """The sequences of ``live`` that pause this step (each one step nearer its pause's end)."""
        paused = [i for i in live if self.left[i] > 0]
        for i in paused:
            self.left[i] -= 1
        return paused

    def verdict(self, slot: int, accepted: int) -> None:
        """A verify round of ``slot`` accepted ``accepted`` drafts."""
        if accepted > 0:
            self.misses[slot], self.next[slot] = 0, self.pause
            return
        self.misses[slot] += 1
        if self.misses[slot] >= 2:
            self.left[slot], self.misses[slot] = self.next[slot], 0
            self.next[slot] = min(2 * self.next[slot], GROWTH * self.pause)
