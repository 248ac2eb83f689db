"""Causal (AR) decoding: prefill the prompt, then one token per sequence per forward from the caches."""

from __future__ import annotations

import torch

from flare.decoding.lane import Lane, Plan, RowLogits


class CausalLane(Lane):
    mode, room = "causal", 1

    def __init__(self, model, slots, options, pacing: dict | None = None) -> None:
        super().__init__(model, slots, options, pacing)
        self.pending = torch.zeros(slots.num_slots, dtype=torch.long, device=slots.device)

    def prefilled(self, slots: list[int], logits: torch.Tensor) -> None:
        self.next_token(slots, self.sample(slots, logits))

    def plan(self, live: list[int]) -> Plan:
        mask = self.slots.mask(live)
        return Plan(self.pending[:, None], mask.long(), torch.zeros_like(self.pending), commits_all=True,
                    same_clean=1)

    def consume(self, live: list[int], logits: RowLogits) -> torch.Tensor:
        greedy = self.slots.all_greedy(live)
        self.next_token(live, logits.picks(0, 1)[:, 0] if greedy else self.sample(live, logits.rows(0, 1)[:, 0]))
        return self.slots.mask(live).long()
