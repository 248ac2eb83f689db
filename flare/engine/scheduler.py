"""Admission and scheduling, pure Python: a FIFO waiting queue, running sequences bound to cache slots.

Each step the scheduler admits waiting sequences into free slots in arrival order while their prompts fit the
step's token budget (a prompt longer than the whole budget is admitted alone, so nothing starves), and every
running sequence takes part in the step. A full waiting queue rejects new requests (the server answers 429);
finishing or aborting a sequence frees its slot at once.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from flare.engine.sequence import Sequence, SequenceStatus


class QueueFull(RuntimeError):
    """The waiting queue is at its limit; the caller should retry later."""


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16  # cache slots: sequences decoding at once
    max_waiting: int = 256
    max_prefill_tokens: int = 4096  # prompt tokens admitted per step

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_waiting", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ScheduledStep:
    admitted: list[Sequence] = field(default_factory=list)  # to prefill this step
    running: list[Sequence] = field(default_factory=list)  # every sequence in a slot, admitted ones included

    @property
    def empty(self) -> bool:
        return not self.running


class Scheduler:
    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        self.free_slots: list[int] = list(range(self.config.max_num_seqs - 1, -1, -1))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.running or any(s.request_id == seq.request_id for s in self.waiting):
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (limit {self.config.max_waiting})")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.config.max_prefill_tokens
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            if step.admitted and seq.prompt_len > budget:
                break
            self.waiting.popleft()
            # The lowest free slot: a step's forward covers slots up to the last busy one only.
            seq.slot = self.free_slots.pop()
            seq.status = SequenceStatus.RUNNING
            self.running[seq.request_id] = seq
            step.admitted.append(seq)
            budget -= seq.prompt_len
        step.running = list(self.running.values())
        return step

    def finish(self, seq: Sequence, reason: str | None = None) -> None:
        """A running sequence is done: its slot is free for the next admission."""
        if reason is not None:
            seq.finish_reason = reason
        self._release(seq, SequenceStatus.FINISHED)

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request wherever it is (a client disconnected); returns it, or None if unknown or done."""
        seq = self.running.get(request_id)
        if seq is not None:
            seq.finish_reason = "abort"
            self._release(seq, SequenceStatus.ABORTED)
            return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.status, seq.finish_reason = SequenceStatus.ABORTED, "abort"
                return seq
        return None

    def _release(self, seq: Sequence, status: SequenceStatus) -> None:
        if self.running.pop(seq.request_id, None) is None:
            raise ValueError(f"request {seq.request_id!r} is not running")
        # Kept in descending order, so that pop() hands out the lowest free slot.
        bisect.insort(self.free_slots, seq.slot, key=lambda slot: -slot)
        seq.slot, seq.status = None, status
