"""One request's life in the engine: ids in, committed ids out, status and counters. Pure Python."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    mode: str = "causal"
    options: dict[str, Any] = field(default_factory=dict)
    params: Any = None  # flare.decoding.SamplingParams (kept untyped: this module imports no torch)
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    slot: int | None = None
    forwards: int = 0
    drafted: int = 0
    accepted: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id}: the prompt is empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.request_id}: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def done(self) -> bool:
        return self.status in (SequenceStatus.FINISHED, SequenceStatus.ABORTED)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def commit(self, tokens: list[int], stop_ids: set[int] = frozenset()) -> list[int]:
        """Append committed tokens up to a stop token or the length limit; returns what was appended (the part
        a stream sends). Marks the sequence finished when it stops."""
        room = self.max_new_tokens - len(self.output_ids)
        taken = []
        for t in tokens[:room]:
            taken.append(t)
            if t in stop_ids:
                self.finish_reason = "stop"
                break
        self.output_ids += taken
        if self.finish_reason is None and len(self.output_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
        return taken
