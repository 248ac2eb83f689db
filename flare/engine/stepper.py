"""Runs decoding lanes over the cache slots of one runner: admissions (prefill) and steps (one forward each).

Each step asks every lane with live slots for its rows, merges them into one batch, and runs ONE forward: a
plain causal forward when every slot commits all its rows (causal decoding, committing a decided block), else a
read-only rows forward whose clean rows are recorded and then committed per slot (AR-Trust's accepted prefix,
nothing for a denoising step). Each lane then reads its slots' logits.

One host read per step (``sync``) brings back everything the host needs: which slots finished, the cache's
true length bounds, what lanes asked for, and each slot's newly emitted tokens and counters, kept in host
mirrors (``Emitted``) that ``decode`` and the engine read without touching the device. An admission's prefill
does not read at all: its slots are live until the next step's read says otherwise. ``decode`` and the
serving engine both run on this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flare.device import pack_linears
from flare.decoding.lane import Lane, RowLogits, pad_slots
from flare.decoding.modes import LANES
from flare.decoding.options import ModeOptions
from flare.decoding.params import SamplingParams
from flare.decoding.slots import SlotBatch
from flare.engine.prefix_cache import PrefixCache
from flare.engine.runner import CachedRunner
from flare.model import FlareModel, frozen_weights
from flare.model.packed_linear import prepack

# A drafting lane's prefill runs each prompt and its MASK rows as one rows forward, whose recurrence is one
# closed-form chunk: its cost grows with slots x rows^2. Past this product prompts get a plain prefill and a cold
# first round. A 0.75B hybrid in bf16, against those two forwards: 0.63x at 1 slot x 35 rows, 0.81-0.92x at the
# limit (1 x 353, 2 x 253, 8 x 128 rows), 1.34x past it (8 x 253).
DRAFTING_PREFILL_WORK = 2**17


@dataclass
class Emitted:
    """Host mirror of one slot's output buffer and counters, as of the last sync."""

    tokens: list[int]
    forwards: int = 0
    drafted: int = 0
    accepted: int = 0


@dataclass
class Admission:
    slot: int
    options: ModeOptions  # checked and resolved (flare.decoding.check_request)
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None


class Stepper:
    # Decoding runs under ``torch.inference_mode``: tensors made there carry no version counter or autograd
    # metadata, and each of a small model's few hundred ops a step costs less (the demo checkpoint, 2 threads:
    # decode() 0.83x the time at batch 1 causally, 0.86x with AR-Trust, against ``no_grad``). What a stepper
    # makes are inference tensors, changed in place only by its own methods, which all run in that mode.
    @torch.inference_mode()
    def __init__(self, model: FlareModel, num_slots: int, capacity: int, runner_cls: type = CachedRunner,
                 runner: CachedRunner | None = None, prefix: PrefixCache | None = None) -> None:
        """``runner``: one to run on instead of a new one (restarted, of ``num_slots`` slots: ``decode`` keeps one
        per shape where decoding is graphed, so its graphs outlive a call); ``prefix``: where admissions keep
        their prompts' states and start from kept beginnings (``flare.engine.prefix_cache``; None: they do not)."""
        self.model = model
        if runner_cls is CachedRunner and pack_linears(model.device, model.dtype):
            prepack(model)  # bf16 on the CPU: weights reordered for oneDNN once, not at every call
        if runner is not None and runner.cache.batch_size != num_slots:
            raise ValueError(f"the runner has {runner.cache.batch_size} slots, not {num_slots}")
        self.runner = runner or runner_cls(model, num_slots, capacity)
        self.slots = SlotBatch(num_slots, model.device)
        self.owner: list[Lane | None] = [None] * num_slots
        self.lanes: dict[ModeOptions, Lane] = {}
        self.emitted: list[Emitted] = [Emitted([]) for _ in range(num_slots)]
        self.prefix = prefix if runner_cls is CachedRunner else None
        self.prompts: list[list[int]] = [[] for _ in range(num_slots)]
        # False while an admission or a step is under way, and after one that raised: the slots' states may then
        # be half-written, and a release keeps nothing of them.
        self.intact = True
        # What clock-paced lanes learn is the model's on the cached path; a reference run's costs are not its.
        self.pacing = model.pacing if runner_cls is CachedRunner else {}

    def lane(self, options: ModeOptions) -> Lane:
        """The lane that runs these (resolved) options: one per distinct options, created on first use."""
        if options not in self.lanes:
            self.lanes[options] = LANES[options.mode](self.model, self.slots, options, self.pacing)
        return self.lanes[options]

    # Steps and admissions keep weight-derived values (packed linears, the LM head's included) for their whole
    # length: the lanes read logits outside the runner's forward.
    @torch.inference_mode()
    @frozen_weights()
    def admit(self, admissions: list[Admission]) -> None:
        """Bind new sequences to free slots and prefill them in one forward: a plain causal one, or (for a lane
        that drafts, e.g. AR-Trust, wants to now, ``Lane.drafting_prefill``, and prompts within
        ``DRAFTING_PREFILL_WORK``) a rows forward that also runs the lane's MASK rows after each prompt; two
        forwards when an admission holds both kinds."""
        if not admissions:
            return
        self.intact = False
        eos = self.model.config.eos_token_ids
        groups: dict[int, tuple[Lane, list[Admission]]] = {}
        for a in admissions:
            if self.owner[a.slot] is not None:
                raise ValueError(f"slot {a.slot} is taken")
            lane = self.lane(a.options)
            stops = sorted(set(a.params.stop_token_ids) | (set() if a.params.ignore_eos else set(eos)))
            self.slots.admit(a.slot, a.params, stops, a.generator, lane.room)
            self.owner[a.slot] = lane
            self.prompts[a.slot], self.emitted[a.slot] = a.prompt, Emitted([])
            groups.setdefault(id(lane), (lane, []))[1].append(a)
        self.runner.reset([a.slot for a in admissions])
        tokens: list[list[int]] = [[] for _ in range(self.slots.num_slots)]
        for lane, group in groups.values():
            for a, t in zip(group, lane.admit([a.slot for a in group], [a.prompt for a in group])):
                tokens[a.slot] = list(t)
        # Drafting lanes' prompts that fit DRAFTING_PREFILL_WORK take the rows prefill instead of the plain one.
        wanting = [(lane, group) for lane, group in groups.values() if lane.drafting_prefill()]
        drafting: list[tuple[Lane, list[Admission]]] = []
        if wanting:
            longest = math.isqrt(DRAFTING_PREFILL_WORK // (max(a.slot for _, g in wanting for a in g) + 1))
            drafting = [(lane, short) for lane, group in wanting
                        if (short := [a for a in group if len(a.prompt) + lane.draft_rows <= longest])]
        drafted = {a.slot for _, group in drafting for a in group}
        # What each slot commits: the prompt (a drafting prefill, or a lane's whole admission), or all but its
        # last token; from a kept beginning of it where there is one.
        commits = {a.slot: list(a.prompt) if a.slot in drafted else tokens[a.slot] for a in admissions}
        start = self._reuse(admissions, commits)
        for slot in range(self.slots.num_slots):
            tokens[slot] = [] if slot in drafted else tokens[slot][start.get(slot, 0):]
        filled = [s for s, t in enumerate(tokens) if t]
        if filled:
            logits = pad_slots(self.runner.prefill(tokens[: max(filled) + 1]), self.slots.num_slots)
            self.slots.active_forwards += self.slots.mask(filled).long()
        else:
            logits = torch.zeros(self.slots.num_slots, self.model.config.vocab_size, device=self.model.device)
        for lane, group in groups.values():
            lane.prefilled([a.slot for a in group if a.slot not in drafted], logits)
        if drafting:
            self._prefill_drafts(drafting, start)
        for a in admissions:
            self.slots.live[a.slot] = True
            if self.prefix is not None:
                self.prefix.keep(self.runner.cache, a.slot, commits[a.slot])
        self.intact = True

    def _reuse(self, admissions: list[Admission], commits: dict[int, list[int]]) -> dict[int, int]:
        """Start each admitted slot from the longest kept beginning of what it commits (``self.prefix``), at
        least one token short of it. First prefill up to a beginning worth keeping, and keep it: one that
        admissions of this call share and nothing kept covers (``PrefixCache.shared_in``: one slot prefills it,
        the others start from it), or with recurrent layers a longer one shared with a kept prompt
        (``PrefixCache.worth_splitting``). Returns each such slot's tokens committed."""
        start: dict[int, int] = {}
        if self.prefix is None:
            return start
        matches = [self.prefix.match(commits[a.slot], len(commits[a.slot]) - 1) for a in admissions]
        cuts, leads = self.prefix.shared_in([commits[a.slot] for a in admissions], [m[1] for m in matches])
        split: list[list[int]] = [[] for _ in range(self.slots.num_slots)]
        for i, (a, (entry, n, shared)) in enumerate(zip(admissions, matches)):
            if i in leads:
                continue  # from its leader's beginning, kept below
            commit = commits[a.slot]
            self._restore(a.slot, entry, n, start)
            if i in cuts:
                split[a.slot] = commit[n:cuts[i]]
            elif self.prefix.worth_splitting(n, shared):
                split[a.slot] = commit[n:shared]
        if any(split):
            self.runner.prefill(split[: max(s for s, t in enumerate(split) if t) + 1])
            for s, t in enumerate(split):
                if t:
                    start[s] = start.get(s, 0) + len(t)
                    self.prefix.keep(self.runner.cache, s, commits[s][:start[s]])
        for i in leads:
            commit = commits[admissions[i].slot]
            self._restore(admissions[i].slot, *self.prefix.match(commit, len(commit) - 1)[:2], start)
        return start

    def _restore(self, slot: int, entry, n: int, start: dict[int, int]) -> None:
        if entry is not None:
            self.prefix.restore(self.runner.cache, slot, entry, n)
            self.runner.known[slot] = start[slot] = n

    def _prefill_drafts(self, groups: list[tuple[Lane, list[Admission]]], start: dict[int, int]) -> None:
        """One rows forward over each prompt (clean rows, all committed; after ``start[slot]`` of its tokens
        already in the cache) and its lane's MASK rows after it."""
        n = max(a.slot for _, group in groups for a in group) + 1
        mask_id = self.model.config.mask_token_id
        clean, noisy = [0] * n, [0] * n
        rows: list[list[int]] = [[] for _ in range(n)]
        for lane, group in groups:
            for a in group:
                rest = a.prompt[start.get(a.slot, 0):]
                rows[a.slot] = list(rest) + [mask_id] * lane.draft_rows
                clean[a.slot], noisy[a.slot] = len(rest), lane.draft_rows
        R = max(len(r) for r in rows)
        dev = self.model.device
        slots = [a.slot for _, group in groups for a in group]
        ids = torch.tensor([r + [0] * (R - len(r)) for r in rows], device=dev)
        num_clean, num_noisy = torch.tensor(clean, device=dev), torch.tensor(noisy, device=dev)
        hidden = self.runner.prefill_rows(ids, num_clean, num_noisy, sorted(slots))
        self.slots.active_forwards += self.slots.mask(slots).long()
        for lane, group in groups:
            lane.prefilled_drafts([a.slot for a in group], hidden, num_clean)

    @torch.inference_mode()
    def forget_pacing(self) -> None:
        """Forget what clock-paced lanes learned (e.g. on warm-up prompts): the lanes are made afresh on next use."""
        if any(lane is not None for lane in self.owner):
            raise RuntimeError("sequences are decoding: finish or release them before forgetting the pacing")
        self.lanes.clear()
        self.pacing.clear()

    @torch.inference_mode()
    def release(self, slot: int) -> None:
        """Free a slot (its sequence finished or was aborted); the next admission may take it. What it committed,
        its prompt and the output before its last token, is kept for a later prompt that goes on from there (a
        conversation's next turn)."""
        lane = self.owner[slot]
        if lane is None:
            return
        if self.prefix is not None and self.intact:
            committed = self.runner.known[slot]  # (exact after the step's read)
            tokens = (self.prompts[slot] + self.emitted[slot].tokens)[:committed or 0]
            if committed and len(tokens) == committed:
                self.prefix.keep(self.runner.cache, slot, tokens)
        lane.release(slot)
        self.slots.release(slot)
        self.owner[slot] = None

    @torch.inference_mode()
    @frozen_weights()
    def step(self) -> bool:
        """One forward for every live slot; False when none is live (nothing ran)."""
        plans = []
        for lane in self.lanes.values():
            live = lane.live()
            if live:
                plans.append((lane, live, lane.plan(live)))
        if not plans:
            return False
        self.intact = False
        S = self.slots.num_slots
        R = max(p.tokens.shape[1] for _, _, p in plans)
        tokens, clean, noisy, seeds, live_all = self._merged(plans, R)
        # A slot that finished at its prefill (a stop token, or a one-token request) is still stepped until this
        # step's read notices; it takes no part in the count, and what it emits past the end is cut on the host.
        self.slots.active_forwards += (self.slots.mask(live_all) & ~self.slots.finished).long()

        # Slots are handed out lowest first: the forward covers slots up to the last live one only (up to a batch
        # size the runner keeps graphs of, where it does).
        n = self.runner.covers(max(live_all) + 1)
        commits_all = all(p.commits_all for _, _, p in plans)
        if commits_all:
            # Every slot the forward covers is live and commits all R rows: no per-row counts (the cache then
            # writes one range of KV slots and keeps every conv window whole).
            uniform = len(live_all) == n and all(p.same_clean == R for _, _, p in plans)
            hidden = self.runner.append(tokens[:n], None if uniform else clean[:n])
        else:
            keys = tuple(p.layout_key for _, _, p in plans)
            bound = max(R if p.clean_bound is None else p.clean_bound for _, _, p in plans)
            hidden = self.runner.rows(tokens[:n], clean[:n], noisy[:n], record=True,
                                      seeds=None if seeds is None else seeds[:n],
                                      layout_key=None if None in keys else keys, clean_rows=bound)
        logits = RowLogits(self.model, hidden, S)
        n_commit, ends = torch.zeros_like(clean), None
        for lane, live, _ in plans:
            n_commit += lane.consume(live, logits)
            own = lane.commit_ends()
            if own is not None:  # (-1 outside the lane's slots)
                ends = own if ends is None else torch.maximum(ends, own)
        if not commits_all:
            self.runner.commit_recorded(n_commit[:n], None if ends is None else ends[:n])
        self.sync()
        self.intact = True
        return True

    def _merged(self, plans: list, R: int):
        """The step's rows [S, R], clean and noisy counts, seeds (or None) and live slots, from every lane's plan
        (a plan's counts are zero outside its live slots; its tokens there are zeroed)."""
        if len(plans) == 1:  # one lane: its plan as it is
            _, live, p = plans[0]
            return torch.where(self.slots.mask(live)[:, None], p.tokens, 0), p.num_clean, p.num_noisy, p.seeds, live
        S = self.slots.num_slots
        first = plans[0][2]
        tokens = torch.zeros(S, R, dtype=torch.long, device=first.tokens.device)
        clean, noisy = torch.zeros_like(first.num_clean), torch.zeros_like(first.num_noisy)
        grouped = any(p.seeds is not None for _, _, p in plans)
        seeds = torch.zeros(S, R, dtype=torch.long, device=tokens.device) if grouped else None
        live_all: list[int] = []
        for _, live, p in plans:
            m = self.slots.mask(live)
            tokens = torch.where(m[:, None], F.pad(p.tokens, (0, R - p.tokens.shape[1])), tokens)
            clean, noisy = torch.where(m, p.num_clean, clean), torch.where(m, p.num_noisy, noisy)
            if grouped:
                # A lane without groups seeds its one noisy group after all of its clean rows.
                own = p.num_clean[:, None].expand(S, R) if p.seeds is None else F.pad(
                    p.seeds, (0, R - p.seeds.shape[1]))
                seeds = torch.where(m[:, None], own, seeds)
            live_all += live
        return tokens, clean, noisy, seeds, live_all

    def sync(self) -> None:
        """The one host read per step: which slots finished, the cache's true length bounds, what each lane
        asked for (``Lane.to_sync``), and every slot's tokens emitted since the last read with its counters.
        New tokens sit in a window of each slot's output buffer that starts at the length last read: a slot
        emits at most one token at its prefill and ``room`` per step."""
        slots, S = self.slots, self.slots.num_slots
        extra = [(lane, t) for lane in self.lanes.values() if (t := lane.to_sync()) is not None]
        width = 1 + max((lane.room for lane in self.lanes.values()), default=1)
        start = torch.tensor([len(e.tokens) for e in self.emitted], device=slots.device)
        at = (start[:, None] + torch.arange(width, device=slots.device)).clamp(max=slots.out.shape[1] - 1)
        values = torch.cat([
            slots.finished.long(), slots.out_len, slots.active_forwards, slots.drafted, slots.accepted,
            slots.out.gather(1, at).flatten(), self.runner.lengths().to(slots.device),
            *[t.long() for _, t in extra]]).tolist()
        finished, out_len, forwards, drafted, accepted = (values[k * S:(k + 1) * S] for k in range(5))
        window, rest = values[5 * S: 5 * S + S * width], values[5 * S + S * width:]
        self.runner.synced(rest[:S])
        for i, (lane, _) in enumerate(extra):
            lane.synced(rest[(1 + i) * S: (2 + i) * S])
        for s in range(S):
            if self.owner[s] is None:
                continue
            e = self.emitted[s]
            e.tokens += window[s * width: s * width + out_len[s] - len(e.tokens)]
            e.forwards, e.drafted, e.accepted = forwards[s], drafted[s], accepted[s]
        slots.live = [self.owner[s] is not None and not finished[s] for s in range(S)]

    def output(self, slot: int) -> tuple[list[int], str | None]:
        """A slot's output as of the last read, cut at its stop token and length limit, and why it ended (None
        while it has not)."""
        e = self.emitted[slot]
        return self.slots.tokens(slot, e.tokens, len(e.tokens))

