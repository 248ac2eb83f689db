"""A decoding mode as a lane: step-wise, over whichever cache slots it owns, beside other lanes.

A lane turns its slots' state into rows for the next forward (``plan``) and the logits of those rows back into
committed tokens (``consume``). The stepper merges every lane's rows into ONE forward per step, so sequences of
different modes share a batch; ``decode`` is the same stepper with a single lane. All per-slot tensors span
every slot of the stepper; a lane only ever reads or changes the rows of the slots it is given.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from flare.decoding.slots import SlotBatch
from flare.model import FlareModel
from flare.model.draft_vocab import draft_law_logits, draft_picks
from flare.ops.sampling import argmax, sample
from flare.ops.take import take_rows


class RowLogits:
    """The logits of a forward's rows, computed only for the rows a lane reads and only for the slots the forward
    covered: the LM head is vocabulary-sized, so AR-Trust drafting from every acceptance point pays for its N
    clean rows and the one group it keeps, not for every group; a block commit pays for its last row; one
    request in a server of 8 slots pays for one slot's rows. Results span every slot (zeros past the covered
    ones); greedy picks are taken before that padding."""

    def __init__(self, model: FlareModel, hidden: torch.Tensor, slots: int | None = None) -> None:
        self.model, self.hidden = model, hidden  # [n, R, E]: the covered slots
        self.slots = hidden.shape[0] if slots is None else slots
        self._rows: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def covered(self) -> int:
        """The slots the forward covered (the head's rows are this many times the rows read per slot)."""
        return self.hidden.shape[0]

    def _logits(self, start: int, stop: int) -> torch.Tensor:
        key = (start, stop)
        if key not in self._rows:
            self._rows[key] = self.model.logits(self.hidden[:, start:stop])
        return self._rows[key]

    def _rows_at(self, index: torch.Tensor) -> torch.Tensor:
        """The covered slots' hidden rows ``index[s, k]`` [n, K, E]."""
        return take_rows(self.hidden, index[:self.covered])

    def _gathered(self, index: torch.Tensor) -> torch.Tensor:
        return self.model.logits(self._rows_at(index))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """[S, stop - start, V]."""
        return pad_slots(self._logits(start, stop), self.slots)

    def covered_rows(self, start: int, stop: int) -> torch.Tensor:
        """``rows`` of the covered slots only [covered, stop - start, V] (no padding)."""
        return self._logits(start, stop)

    def picks(self, start: int, stop: int) -> torch.Tensor:
        """The argmax of ``rows(start, stop)`` [S, stop - start] (padding slots pick 0)."""
        return pad_slots(argmax(self._logits(start, stop)), self.slots)

    def at(self, index: torch.Tensor) -> torch.Tensor:
        """[S, K, V]: row index[s, k] of each slot."""
        return pad_slots(self._gathered(index), self.slots)

    def picks_at(self, index: torch.Tensor) -> torch.Tensor:
        """The argmax of ``at(index)`` [S, K]."""
        return pad_slots(argmax(self._gathered(index)), self.slots)

    def draft_picks_at(self, index: torch.Tensor, vocab: int) -> torch.Tensor:
        """``picks_at`` among the draft vocabulary of ``vocab`` (``flare.model.draft_vocab``) [S, K]."""
        return pad_slots(draft_picks(self.model, self._rows_at(index), vocab), self.slots)

    def draft_at(self, index: torch.Tensor, vocab: int) -> torch.Tensor:
        """``at`` over the draft vocabulary of ``vocab``, -inf at every other token [S, K, V]."""
        return pad_slots(draft_law_logits(self.model, self._rows_at(index), vocab), self.slots)


def after_prompt(hidden: torch.Tensor, prompt_len: torch.Tensor, k: int) -> torch.Tensor:
    """[n, k, E]: a drafting prefill's rows from each prompt's last row on (its MASK rows after it); ``hidden``
    [n, R, E], ``prompt_len`` [n]. Slots of other lanes may have fewer rows: theirs are clamped, never read."""
    at = (prompt_len - 1).clamp(min=0)[:, None] + torch.arange(k, device=hidden.device)
    return take_rows(hidden, at.clamp(max=hidden.shape[1] - 1))


def pad_slots(x: torch.Tensor, slots: int) -> torch.Tensor:
    """Zero rows appended to reach ``slots`` (the slots a narrowed forward did not cover)."""
    if x.shape[0] == slots:
        return x
    return torch.cat([x, x.new_zeros(slots - x.shape[0], *x.shape[1:])])


@dataclass
class Plan:
    """A lane's rows for one forward: [clean x num_clean ; noisy x num_noisy ; padding] per slot (zero counts
    for slots it does not own)."""

    tokens: torch.Tensor  # [S, R]
    num_clean: torch.Tensor  # [S] long
    num_noisy: torch.Tensor  # [S] long
    # Every live slot commits all its clean rows and has no noisy row: the forward can be a plain causal one.
    commits_all: bool
    # The clean-row count of every live slot when they all have the same one (host side), else None.
    same_clean: int | None = None
    # [S, R]: for each noisy row, the clean prefix its group is seeded after (flare.model.row_tree); None: one
    # group after all clean rows.
    seeds: torch.Tensor | None = None
    # A host-side name of (num_clean, num_noisy, seeds): plans with equal keys have equal layouts, so what is
    # derived from one (a row tree) serves the other. None: not known on the host.
    layout_key: Hashable | None = None
    # The most clean rows any slot has (host side; None: the row width): only these can be committed, so a
    # commit keeps no more rows (flare.ops.gated_delta.pending).
    clean_bound: int | None = None


class Lane:
    mode: str = ""
    room: int = 1  # the most tokens one step can emit for a slot
    # MASK rows the admission prefill may append after a prompt (``prefilled_drafts``); 0: a plain prefill.
    draft_rows: int = 0

    def __init__(self, model: FlareModel, slots: SlotBatch, options, pacing: dict | None = None) -> None:
        """``pacing``: where a lane paced by the clock keeps what it learned, across lanes (the stepper gives
        ``FlareModel.pacing`` with caches, a dict of its own without)."""
        self.model, self.slots, self.options = model, slots, options
        self.pacing = {} if pacing is None else pacing
        self.owned: list[int] = []

    def live(self) -> list[int]:
        return [s for s in self.owned if self.slots.live[s]]

    def release(self, slot: int) -> None:
        self.owned.remove(slot)

    def admit(self, slots: list[int], prompts: list[list[int]]) -> list[list[int]]:
        """Take new sequences; return the tokens to commit to each slot in the admission prefill."""
        self.owned += slots
        return prompts

    def prefilled(self, slots: list[int], logits: torch.Tensor) -> None:
        """The admission prefill ran; ``logits`` [S, V] after each slot's last prefilled token."""

    def drafting_prefill(self) -> bool:
        """Whether the sequences just admitted want the drafting prefill (``draft_rows`` MASK rows after each
        prompt, ``prefilled_drafts``) rather than the plain one."""
        return self.draft_rows > 0

    def prefilled_drafts(self, slots: list[int], hidden: torch.Tensor, prompt_len: torch.Tensor) -> None:
        """The admission prefill committed each slot's WHOLE prompt and ran ``draft_rows`` MASK rows after it:
        ``hidden`` [n, R, E] (the first n slots, those the forward covered) holds the prompt's rows, then the MASK
        rows, then padding (``prompt_len`` [n])."""
        raise NotImplementedError

    def plan(self, live: list[int]) -> Plan:
        raise NotImplementedError

    def consume(self, live: list[int], logits: RowLogits) -> torch.Tensor:
        """Read the logits of the planned rows; return how many clean rows each slot commits [S]."""
        raise NotImplementedError

    def commit_ends(self) -> torch.Tensor | None:
        """After ``consume``: [S] the row that ends each slot's commit where it is not the last of its committed
        clean rows (a branch row, ``flare.decoding.groups``; -1 elsewhere), or None: everywhere the last."""
        return None

    def to_sync(self) -> torch.Tensor | None:
        """A [S] tensor the lane needs on the host before its next plan, read in the stepper's one sync."""
        return None

    def synced(self, values: list[int]) -> None:
        """The host values of ``to_sync()``."""

    # --------------------------------------------------------------------------------------------- helpers
    def sample(self, live: list[int], logits: torch.Tensor) -> torch.Tensor:
        """One token per slot [S] from the logits [n, V] of the first n slots, n past every live one (or [S, T]
        tokens from [n, T, V]), with each slot's own settings; zeros outside ``live``. Greedy batches never build a
        distribution."""
        if self.slots.all_greedy(live):
            return pad_slots(argmax(logits), self.slots.num_slots)
        s = self.slots
        filters = s.filters(live)
        return s.per_generator(live, lambda lg, t, k, p, g: sample(lg, t, k, p, g, filters), logits, s.temperature,
                               s.top_k, s.top_p)

    def next_token(self, slots: list[int], tok: torch.Tensor) -> None:
        """Each of ``slots``' next token [S] (drawn from the logits after its last committed one): emitted, and
        its ``pending`` token, which the next step's forward commits (lanes that keep one)."""
        mask = self.slots.mask(slots)
        self.pending = torch.where(mask, tok, self.pending)
        self.slots.emit(tok[:, None], mask.long())

    def counts(self, mask: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
        """n where ``mask`` else 0, as a [S] long tensor."""
        return torch.where(mask, n, 0).long()
