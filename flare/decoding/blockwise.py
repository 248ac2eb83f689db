"""Block-wise parallel denoising: Diffusion-Trust and the low-confidence peer decoders, one lane (method §3).

A block of rows after the committed tokens: Diffusion-Trust's ``[seed, MASK x (b-1)]`` (the seed, sampled from
the last causal logits, is a clean row) or the peers' ``[MASK x b]``. With the logit shift, block position j is
predicted by row j-1, and position 0 by the last committed row. Each denoising step is one read-only forward;
it samples every undecided position and commits some by confidence (the untempered probability of the sampled
token). When the block is decided, one forward commits it to the caches and gives the logits for what follows.
Each slot moves through these phases on its own, so slots at different phases share a forward.

Which rows a denoising step shows (``row_inputs``): the training objective supervises only MASK rows of a noisy
block (a masked row i predicts token i+1) and clean causal rows, so every prediction a step reads must come
from one of those. The decided prefix of the block runs as clean rows (the seed, then any positions decided
left to right: their rows give the causal distribution of the next position); a decided position after an
undecided one shows its token only when its own row's prediction is not needed (the next position is decided
too, or lies past the block), and a MASK otherwise. An unmasked noisy row's output, never trained, is never read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flare.decoding.lane import Lane, Plan, RowLogits, after_prompt, pad_slots
from flare.decoding.options import BlockOptions

DECIDED = -1  # a slot's step counter once its block is decided: the next forward commits it


def choose(conf: torch.Tensor, undecided: torch.Tensor, options: BlockOptions, step: torch.Tensor,
           max_steps: int) -> torch.Tensor:
    """Which undecided positions to commit this step [S, T] (at least one per row that has any); ``step`` [S]
    is each row's denoising step."""
    conf = torch.where(undecided, conf, torch.full_like(conf, -1.0))
    best = torch.zeros_like(undecided).scatter(1, conf.argmax(1, keepdim=True), True) & undecided
    if options.threshold is not None:
        pick = (undecided & (conf > options.threshold)) | best
    else:
        # Fixed steps: commit the most confident ceil(remaining / steps left) positions.
        left = undecided.sum(1)
        k = -(-left // (max_steps - step).clamp(min=1))
        rank = conf.argsort(1, descending=True).argsort(1)
        pick = undecided & (rank < k[:, None])
    return torch.where((step >= max_steps - 1)[:, None], undecided, pick)


def row_inputs(block: torch.Tensor, undecided: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A denoising step's rows [S, T] and its number of clean rows [S]: the decided prefix as clean rows, then
    each position's token where it is decided and its row's prediction is not needed, else the MASK."""
    decided = ~undecided
    prefix = decided.long().cumprod(1).sum(1)
    needed = F.pad(undecided[:, 1:], (0, 1), value=False)  # row i predicts position i + 1
    show = decided & ~needed
    in_prefix = torch.arange(block.shape[1], device=block.device) < prefix[:, None]
    return torch.where(show | in_prefix, block, torch.full_like(block, mask_id)), prefix


class BlockLane(Lane):
    def __init__(self, model, slots, options: BlockOptions, pacing: dict | None = None) -> None:
        super().__init__(model, slots, options, pacing)
        self.mode, self.seeded = options.mode, options.seeded
        self.mask_id = model.config.mask_token_id
        S, T, dev = slots.num_slots, options.block_size, slots.device
        self.T, self.room = T, T
        self.max_steps = options.steps if options.steps is not None else T
        self.block = torch.full((S, T), self.mask_id, dtype=torch.long, device=dev)
        self.undecided = torch.zeros(S, T, dtype=torch.bool, device=dev)
        self.last = torch.zeros(S, model.config.vocab_size, device=dev, dtype=model.dtype)
        self.step_of = [DECIDED] * S  # host: each slot's denoising step, or DECIDED
        self._denoised: list[int] = []  # slots that ran a denoising step this forward (advanced at the sync)
        # With a look-ahead the admission prefill runs the first block's MASK rows too (its first denoising step).
        self.draft_rows = T if options.lookahead and T > int(self.seeded) else 0

    def prefilled(self, slots: list[int], logits: torch.Tensor) -> None:
        mask = self.slots.mask(slots)
        self.last = torch.where(mask[:, None], logits.to(self.last.dtype), self.last)
        self._new_block(slots)

    def prefilled_drafts(self, slots: list[int], hidden: torch.Tensor, prompt_len: torch.Tensor) -> None:
        """The prefill ran the first block as MASK rows after each prompt: the prompt's last row gives ``last``
        (and the seed), the MASK rows the block's look-ahead step. Its slots count that step on the host (no
        read here): a block it decided whole costs one forward that finds nothing undecided."""
        T = self.T
        rows = RowLogits(self.model, after_prompt(hidden, prompt_len, T), self.slots.num_slots).covered_rows(0, T)
        self._keep_last(slots, rows[:, 0])
        self._new_block(slots)
        self._denoise(slots, rows[:, 1:], seedless=self.seeded, record=False)
        for i in slots:
            self.step_of[i] = 1

    def _keep_last(self, slots: list[int], logits: torch.Tensor) -> None:
        """``last`` of ``slots`` from the logits [n, V] of the first n slots (those a forward covered)."""
        n = logits.shape[0]
        self.last[:n] = torch.where(self.slots.mask(slots)[:n, None], logits.to(self.last.dtype), self.last[:n])

    def _new_block(self, slots: list[int]) -> None:
        mask = self.slots.mask(slots)[:, None]
        block = torch.full_like(self.block, self.mask_id)
        undecided = torch.ones_like(self.undecided)
        if self.seeded:
            block[:, 0] = self.sample(slots, self.last)
            undecided[:, 0] = False
        self.block = torch.where(mask, block, self.block)
        self.undecided = torch.where(mask, undecided, self.undecided)
        for s in slots:
            self.step_of[s] = 0 if self.T > int(self.seeded) else DECIDED

    def plan(self, live: list[int]) -> Plan:
        committing = [s for s in live if self.step_of[s] == DECIDED]
        denoising = [s for s in live if self.step_of[s] != DECIDED]
        cm, dm = self.slots.mask(committing), self.slots.mask(denoising)
        T, ahead = self.T, self.options.lookahead and committing
        if not denoising and not ahead:
            return Plan(self.block, self.counts(cm, T), self.counts(cm, 0), commits_all=True, same_clean=T)
        tokens, prefix = row_inputs(self.block, self.undecided, self.mask_id)
        tokens = torch.where(dm[:, None], tokens, self.block)
        clean = self.counts(cm, T) + self.counts(dm, prefix)
        noisy = self.counts(dm, T - prefix)
        if ahead:
            # A committing block's rows, then the next block as T MASK rows: a fully masked training block
            # seeded after the committed one.
            tokens = torch.cat([tokens, torch.full_like(tokens, self.mask_id)], dim=1)
            noisy = noisy + self.counts(cm, T)
        return Plan(tokens, clean, noisy, commits_all=False, clean_bound=T)

    def to_sync(self) -> torch.Tensor | None:
        return self.undecided.any(1) if self._denoised else None

    def synced(self, values: list[int]) -> None:
        """A denoised slot's block is decided when nothing is left undecided or its steps are used up."""
        for i in self._denoised:
            self.step_of[i] += 1
            if not values[i] or self.step_of[i] >= self.max_steps:
                self.step_of[i] = DECIDED
        self._denoised = []

    def _denoise(self, slots: list[int], rows: torch.Tensor, seedless: bool = False, record: bool = True) -> None:
        """One denoising step of these slots' blocks from the logits of the rows before each block position
        [n, T - 1, V] of the first n slots, those the forward covered: no softmax over an engine's idle slots
        (position 0 is predicted by ``last``). ``seedless``: a look-ahead step of a seeded block, whose rows did
        not see the seed: it commits only positions above the threshold, none forced."""
        S, n = self.slots.num_slots, rows.shape[0]
        pred = torch.cat([self.last[:n, None], rows.to(self.last.dtype)], dim=1)  # position j <- row j - 1
        cand = self.sample(slots, pred)
        conf = pad_slots(torch.softmax(pred.float(), -1).gather(-1, cand[:n, :, None])[..., 0], S)
        undecided = self.undecided & self.slots.mask(slots)[:, None]
        if seedless:
            commit = undecided & (conf > self.options.threshold)
        else:
            step = torch.tensor(self.step_of, device=self.slots.device)
            commit = choose(conf, undecided, self.options, step, self.max_steps)
        self.block = torch.where(commit, cand, self.block)
        self.undecided &= ~commit
        if record:
            self._denoised += slots  # their next phase is decided at the stepper's sync (to_sync)

    def consume(self, live: list[int], row_logits: RowLogits) -> torch.Tensor:
        s, T = self.slots, self.T
        committing = [i for i in live if self.step_of[i] == DECIDED]
        denoising = [i for i in live if self.step_of[i] != DECIDED]
        ahead = bool(self.options.lookahead and committing)
        # A denoising step reads every row before its last; a commit its last row (and with a look-ahead the
        # next block's rows before its last).
        lo, hi = (0 if denoising else T - 1), (2 * T - 1 if ahead else T)
        logits = row_logits.covered_rows(lo, hi)  # [n, hi - lo, V]: the covered slots
        if denoising:
            self._denoise(denoising, logits[:, : T - 1])
        if not committing:
            return torch.zeros(s.num_slots, dtype=torch.long, device=s.device)
        cm = s.mask(committing)
        n_commit = self.counts(cm, T)
        s.emit(self.block, n_commit)
        self._keep_last(committing, logits[:, T - 1 - lo])
        self._new_block(committing)
        if ahead:
            started = [i for i in committing if self.step_of[i] != DECIDED]
            if started:
                self._denoise(started, logits[:, T - lo: 2 * T - 1 - lo], seedless=self.seeded)
        return n_commit
