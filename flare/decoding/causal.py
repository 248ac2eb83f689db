"""Causal (AR) decoding: prefill the prompt, then one token per sequence per forward from the caches."""

from __future__ import annotations

import torch

from flare.decoding.lane import Lane, Plan, RowLogits


class CausalLane(Lane):
    mode, room = "causal", 1

    def __init__(self, model, slots, options) -> None:
        super().__init__(model, slots, options)
        self.pending = torch.zeros(slots.num_slots, dtype=torch.long, device=slots.device)

    def prefilled(self, slots: list[int], logits: torch.Tensor) -> None:
        self._next(slots, logits)

    def plan(self, live: list[int]) -> Plan:
        mask = self.slots.mask(live)
        return Plan(self.pending[:, None], mask.long(), torch.zeros_like(self.pending), commits_all=True,
                    same_clean=1)

    def consume(self, live: list[int], logits: RowLogits) -> torch.Tensor:
        self._next(live, logits.rows(0, 1)[:, 0])
        return self.slots.mask(live).long()

    def _next(self, slots: list[int], logits: torch.Tensor) -> None:
        """Sample each slot's next token from the logits after its last committed one, and emit it (it is
        committed to the cache by the next step's forward)."""
        mask = self.slots.mask(slots)
        tok = self.sample(slots, logits)
        self.pending = torch.where(mask, tok, self.pending)
        self.slots.emit(tok[:, None], mask.long())
