"""What every decode returns: the tokens and the counters that say how they were produced."""

from __future__ import annotations

from dataclasses import dataclass, field

from flare.decoding.options import ModeOptions


@dataclass
class DecodeResult:
    options: ModeOptions  # as run: resolved against the checkpoint
    token_ids: list[list[int]]
    finish_reasons: list[str]
    forwards: int  # model forward calls, prefill included
    active_forwards: int = 0  # sum over sequences of the forwards each took part in while unfinished
    drafted: int = 0
    accepted: int = 0
    kernel_paths: dict[str, str] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.options.mode

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_forward(self) -> float:
        """Tokens a sequence gains per forward it takes part in (1.0 for causal decoding)."""
        return self.new_tokens / self.active_forwards if self.active_forwards else 0.0

    def to_dict(self) -> dict:
        return {
            "mode": self.mode, "options": self.options.given(), "token_ids": self.token_ids,
            "finish_reasons": self.finish_reasons, "forwards": self.forwards, "active_forwards": self.active_forwards,
            "drafted": self.drafted, "accepted": self.accepted, "kernel_paths": self.kernel_paths,
            "tokens_per_forward": self.tokens_per_forward, "new_tokens": self.new_tokens,
        }
