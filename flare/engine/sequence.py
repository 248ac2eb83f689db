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
    options: Any = None  # the mode's resolved options (a flare.decoding.ModeOptions; untyped: no torch here)
    params: Any = None  # flare.decoding.SamplingParams (kept untyped: this module imports no torch)
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    slot: int | None = None
    forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    # Clock readings (the engine's ``time.perf_counter``): added, first tokens seen by the caller, ended; and how
    # many tokens that first output held.
    arrived: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    first_output: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id}: the prompt is empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.request_id}: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def mode(self) -> str:
        return self.options.mode

    @property
    def done(self) -> bool:
        return self.status in (SequenceStatus.FINISHED, SequenceStatus.ABORTED)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first output a caller could see (None before it)."""
        if self.arrived is None or self.first_token_at is None:
            return None
        return self.first_token_at - self.arrived

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first output, over the finished request: (end - first output) /
        the tokens that came after it (None while running, or when the first output held every token). vLLM's
        TPOT divides by all tokens but one instead; for a mode whose first output holds several tokens (AR-Trust:
        the prefill's token and a whole round's) that would count tokens made before its clock started."""
        after = len(self.output_ids) - self.first_output
        if self.finished_at is None or self.first_token_at is None or after < 1:
            return None
        return (self.finished_at - self.first_token_at) / after

    def update(self, output_ids: list[int], finish_reason: str | None) -> list[int]:
        """Take the sequence's whole output so far (already cut at its stop token and length limit) and why it
        ended (None while running); returns the tokens new since the last update (what a stream sends)."""
        if output_ids[: len(self.output_ids)] != self.output_ids:
            raise ValueError(f"request {self.request_id}: committed tokens cannot change")
        new = output_ids[len(self.output_ids):]
        self.output_ids = list(output_ids)
        if finish_reason is not None:
            self.finish_reason = finish_reason
        return new
