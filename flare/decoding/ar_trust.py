"""AR-Trust: self-speculative decoding whose output follows the AR model's distribution exactly (method §3).

Each round is ONE forward over ``[pending, d_1 .. d_{N-1}, MASK x (N-1)]``: the causal rows give the target
law p for every draft (and a bonus row), the MASK rows draft the next round with proposal law q, which is stored
at draft time. Speculative sampling accepts a prefix of the drafts; the cache then commits exactly the pending
token and the accepted drafts (per-position GDN and conv states, no replay).

After a rejection a sequence has no drafts: its next round is a cold start ``[pending, MASK x (N-1)]``, which
yields one token and fresh drafts. Cold and warm sequences share one batched forward: a cold row's block simply
starts earlier and ends in padding (per-row ``num_clean``). The first round would be cold too; instead the
admission prefill plays it (``prefilled_drafts``): the whole prompt as clean rows and a MASK group after it, so a
request's first token and its first drafts come with its prefill, and its first round already verifies.

With ``redraft="every"`` (our extension, method §3) the round holds a MASK group after ``pending, d_1 .. d_k``
for every k (``flare.decoding.groups``), so no round is cold; ``tree`` adds a branch for the first draft's second
choice. Those rows pay where rows are cheap (a GPU) or the batch is small; ``redraft="auto"`` (the default) lets
the pacer weigh them against one group for up to ``AUTO_EVERY_SLOTS`` sequences (unpaced, ``pause=0``: every for
such greedy batches, else one group).

Where drafting fails a sequence of a batch that is not paced pauses (``flare.decoding.pauses``); a step whose
sequences are all paused is a plain causal forward. In a round that drafts anyway a paused greedy sequence drafts
along (its rows cost nothing more, and its tokens are the causal ones either way); a sampled one is held.

A batch is paced (``flare.decoding.pacer``) unless a sampled sequence in it is seeded (its tokens would depend on
the clock): each round makes m drafts, 1 <= m <= N-1, or N-1 with a group per acceptance point, or is a causal
step, whichever commits fastest. A slot holds the drafts its last round made (``have``); a round verifies as many
as it has rows for (speculative sampling is exact on any prefix of drafts drawn from their own laws).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flare.decoding.groups import Groups
from flare.decoding.lane import Lane, Plan, RowLogits, after_prompt, pad_slots
from flare.decoding.pacer import CAUSAL, EVERY, Pacer
from flare.decoding.pauses import Pauses
from flare.device import cpu_path
from flare.ops.sampling import argmax, draw, filtered_probs, speculative_verify
from flare.ops.take import take_rows


# With a group per acceptance point the LM head reads every row in one pass up to this many rows (slots x rows),
# but always in two where rows cost in a large head (a CPU without AMX, ``SMALL_HEAD`` weights or more: an EPYC
# with AVX-512-BF16, SmolLM2's 49,153 x 576 in bf16, 25 rows 6.4 ms, 5 + 4 rows in two passes 3.7 ms; a round
# 43.5 -> 42.3 ms at batch 1, 75.6 -> 66.6 ms at batch 2; tokens/s on the speed prompts: within noise, +0-2%).
ONE_PASS_ROWS, SMALL_HEAD = 64, 1 << 22
# redraft=auto: a group per acceptance point is a kind only while at most this many sequences draft, unpaced
# (pause=0) that of greedy batches (demo, tokens/s against last: batch 1 1.13x, 2 1.02x, 4 0.90-0.93x; SmolLM2 bf16,
# batch 1: 0.85x, so the pacer chooses; at 8 sequences its rounds cost 2.9x a causal step: benchmarks/README.md).
AUTO_EVERY_SLOTS = 2
# The settings that draft from every acceptance point (tree: with the branch, ``flare.decoding.groups``).
EVERY_FORMS = ("every", "tree")


class ArTrustLane(Lane):
    mode = "ar_trust"

    def __init__(self, model, slots, options, pacing: dict | None = None) -> None:
        super().__init__(model, slots, options, pacing)
        self.mask_id = model.config.mask_token_id
        vocab = model.lm_head.weight.shape[0]
        self.short = options.draft_vocab if 0 < options.draft_vocab < vocab else 0  # 0: the whole vocabulary
        cheap_rows = slots.device.type != "cpu" or cpu_path() == "amx" or model.lm_head.weight.numel() < SMALL_HEAD
        self.one_pass_rows = ONE_PASS_ROWS if cheap_rows else 0
        S, dev = slots.num_slots, slots.device
        self.N = self.room = options.gen_block
        self.M = self.draft_rows = self.N - 1
        self.pending = torch.zeros(S, dtype=torch.long, device=dev)
        # The drafts each slot holds for its next round (0: cold, after a rejection: [pending, MASK x m], 1 token and
        # fresh drafts); a warm round verifies v of them: [pending, d_1..d_v, MASK x m] (m: M, or fewer if paced).
        self.have = torch.zeros(S, dtype=torch.long, device=dev)
        self.drafts = torch.zeros(S, self.M, dtype=torch.long, device=dev)
        self.q: torch.Tensor | None = None  # [S, M, V] proposal laws, built once a slot samples
        self.masks_row = torch.full((S, self.M), self.mask_id, dtype=torch.long, device=dev)
        # Groups of M MASK rows: one after all drafts, or one after each prefix pending, d_1 .. d_k (every, tree
        # with a branch: flare.decoding.groups); auto picks per round (``plan``).
        self.layouts = {branch: Groups(self.N, self.mask_id, S, dev, branch) for branch in (False, True)}
        self.every, self.layout = options.redraft in EVERY_FORMS, self.layouts[False]
        self.second, self.ends = torch.zeros(S, dtype=torch.long, device=dev), None  # branch tokens, commit ends
        self.pauses = Pauses(S, options.pause)
        self.verdict = torch.full((S,), -1, dtype=torch.long, device=dev)  # per slot, read at the sync (-1: none)
        # Per slot (host): the kind of the round whose MASK rows made its drafts, now and as the round in flight
        # verifies them (the pacer learns acceptance per kind of drafts).
        self.made_by, self.verified_by = [self.M] * S, [self.M] * S
        self.paused: list[int] = []
        self.held: torch.Tensor | None = None  # [S] bool at the paused slots of a round that also drafts
        # Paced batches: rounds of m <= M drafts and MASK rows, M drafts with a group per acceptance point, or causal
        # steps, whichever commits faster (flare.decoding.pacer), greedy and sampled batches apart (sampled drafts
        # pass less often). Pacers outlive the lane (``self.pacing``: the model's, with caches).
        redraft = options.redraft
        self.pacers = {greedy: self.pacing.setdefault((options, greedy), Pacer(
            self.M, lengths=() if redraft in EVERY_FORMS else None, every=redraft != "last",
            every_slots=AUTO_EVERY_SLOTS if redraft == "auto" else None)) for greedy in (True, False)}
        self.pacer = self.pacers[True]  # the pacer of the round in flight
        self.m = self.M  # drafts verified and MASK rows of the round in flight
        self.v = self.have  # [S] the drafts each slot verifies in the round in flight
        self.round: list[int] = []  # the slots of the round in flight
        self.compiles_seen = model.compiles
        self.whole: set[int] = set()  # the slots of the last admission committed whole (``admit``)

    def admit(self, slots: list[int], prompts: list[list[int]]) -> list[list[int]]:
        """Commit all but the last prompt token: that one is the first pending token (the drafting prefill, or
        a plain one and a cold first round). Where the pacer runs causal steps at this batch's size, drafts
        made now would go unread: the prompts are then committed whole, as causal decoding's, and the first
        token comes from the prefill's logits (``prefilled``)."""
        self.owned += slots
        idx = torch.tensor(slots, device=self.slots.device)
        self.pending[idx] = torch.tensor([p[-1] for p in prompts], device=self.slots.device)
        self.have[idx] = 0
        self.pauses.reset(slots)
        self._use(self.pacers[self.slots.all_greedy(self.owned)])
        self.pacer.skip()
        paced, covered = self._paced(self.owned), max(self.owned) + 1
        causal = paced and self.pacer.prefers_causal(covered)
        kind = self.pacer.current(covered) if paced and not causal else self.M
        self.whole = set(slots) if causal else set()
        # The prefill's MASK group is as long as the rounds the pacer runs at this width: a shorter group drafts
        # better (draft 2 after draft 1, converted SmolLM2: 86% from groups of two, 69% of four) and its rows
        # are not made for nothing. A group per acceptance point plays its cold round as one group of M.
        self.draft_rows = kind if 0 < kind < self.M and self.options.redraft not in EVERY_FORMS else self.M
        return [list(p) for p in prompts] if causal else [p[:-1] for p in prompts]

    def drafting_prefill(self) -> bool:
        return not self.whole

    def prefilled(self, slots: list[int], logits: torch.Tensor) -> None:
        """The sequences admitted whole (``admit``) take their first token from the prefill, as causal decoding's
        do; the others' first pending token is their prompt's last."""
        whole = [s for s in slots if s in self.whole]
        if whole:
            self.next_token(whole, self.sample(whole, logits))

    def prefilled_drafts(self, slots: list[int], hidden: torch.Tensor, prompt_len: torch.Tensor) -> None:
        """The prefill's rows are a cold round's: the prompt's last row stands for the pending token (its causal
        row) and the MASK group after it drafts. Consumed as that round, so every draw matches a cold round's."""
        n, _, E = hidden.shape
        N, m = self.N, self.draft_rows  # M, or the shorter length the pacer runs (``admit``)
        picked = after_prompt(hidden, prompt_len, 1 + m)
        # A cold round's layout: [pending, MASK x m] (last), [pending, placeholders x M, group 0] (every); its
        # drafts are the same in both (one group seeded after the pending token): auto plays it as one group.
        self.every, self.m, self.v = self.options.redraft in EVERY_FORMS, m, torch.zeros_like(self.have)
        self.layout = self.layouts[self._branches(slots)]  # (a cold round: no branch taken)
        start = self.layout.lead if self.every else 1
        rows = hidden.new_zeros(n, self.layout.rows if self.every else 1 + 2 * m, E)
        rows[:, 0], rows[:, start:start + m] = picked[:, 0], picked[:, 1:]
        self.paused, self.held = [], None
        self.consume(slots, RowLogits(self.model, rows, self.slots.num_slots))

    def _paced(self, slots: list[int]) -> bool:
        """Whether the pacer chooses the rounds of ``slots``: pauses on, and no seeded sampled sequence among them."""
        return self.options.pause > 0 and not self.slots.seeded(slots)

    def _branches(self, live: list[int]) -> bool:
        """tree's branch where drafts are argmax picks (a correction of drafts drawn from their law lands where the
        target's law exceeds theirs, seldom on their second choice: none in 91 rejections of an 8-token model)."""
        return self.options.redraft == "tree" and (self.options.draft_policy != "exact_truncated"
                                                   or self.slots.all_greedy(live))

    def commit_ends(self) -> torch.Tensor | None:
        return self.ends

    def _use(self, pacer: Pacer) -> None:
        if pacer is not self.pacer:  # the other pacer's round in flight is not timed, nor this one's first (cold)
            self.pacer.skip()
            self.pacer, pacer.last = pacer, None

    def plan(self, live: list[int]) -> Plan:
        self.paused = self.pauses.take(live)
        greedy = self.slots.all_greedy(live)
        every = self.options.redraft in EVERY_FORMS
        if self.options.redraft == "auto":
            # Greedy batches only, so that a seeded sampled request's draws never depend on its batch; without
            # the pacer, while the batch is small (every slot of the forward pays for its width, paused ones too).
            every = greedy and len(live) <= AUTO_EVERY_SLOTS
        m = self.M
        self._use(self.pacers[greedy])
        if self.options.pause:
            if not self._paced(live):
                self.pacer.skip()  # a seeded sampled sequence's rounds are not paced, and not timed
            else:
                if self.model.compiles != self.compiles_seen:
                    # A graph compiled in the round in flight (FLARE_COMPILE): its seconds are the compiler's.
                    self.compiles_seen = self.model.compiles
                    self.pacer.skip()
                kind = self.pacer.next(len(live), max(live) + 1)
                if kind == CAUSAL:
                    self.paused = list(live)
                else:  # the pacer's choice, not each sequence's pause: a pause is a causal step it never timed
                    self.paused = []
                    every, m = kind == EVERY, (self.M if kind == EVERY else kind)
            self.round = live
        mask = self.slots.mask(live)
        if len(self.paused) == len(live):  # every sequence steps causally: a plain causal forward
            self.round = []  # no verdict to read (the pacer times the step all the same)
            return Plan(self.pending[:, None], mask.long(), torch.zeros_like(self.pending), commits_all=True,
                        same_clean=1)
        # The round drafts: a paused greedy sequence drafts along, since its rows are in the forward either way
        # (held out it would only lose its drafts); a sampled one stays held, so its draws follow its own verdicts.
        self.paused = [i for i in self.paused if not self.slots.params[i].greedy]
        self.every, self.m = every, m
        self.v = v = self.have.clamp(max=m)  # the drafts this round verifies
        verified = torch.arange(m, device=v.device) < v[:, None]
        middle = torch.where(verified, self.drafts[:, :m], self.masks_row[:, :m])
        self.layout = self.layouts[every and self._branches(live)]
        if every:
            rows = self.layout.tokens(self.pending, middle, self.second)
        else:
            rows = torch.cat([self.pending[:, None], middle, self.masks_row[:, :m]], dim=1)  # cold: padding after
        # A cold round's drafts (every) are placeholders: its verdict is "none accepted", read from group 0.
        clean = self.counts(mask, self.N if every else 1 + v)
        noisy = self.counts(mask, rows.shape[1] - (self.N if every else 1 + m))
        self.held = self.slots.mask(self.paused) if self.paused else None
        if self.held is not None:  # paused sequences: their pending token alone
            clean, noisy = torch.where(self.held, 1, clean), torch.where(self.held, 0, noisy)
        # A group per acceptance point: one layout (cold rounds too) per live and paused slots, one row tree.
        key = (self.mode, self.N, self.layout.branch, tuple(live), tuple(self.paused)) if every else None
        return Plan(rows, clean, noisy, commits_all=False, seeds=self.layout.seeds if every else None,
                    layout_key=key, clean_bound=self.layout.clean if every else 1 + m)

    def to_sync(self) -> torch.Tensor | None:
        return self.verdict if self.options.pause and self.round else None  # once per round this lane ran

    def synced(self, values: list[int]) -> None:
        """Each slot's verdict: two verify rounds in a row without an accepted draft start a pause; the pacer
        learns each draft position's acceptance."""
        verdicts = {i: divmod(values[i], self.M + 1) for i in self.owned if values[i] >= 0}  # (verified, accepted)
        if self.round:
            seen = [i for i in self.round if i in verdicts]
            self.pacer.observe([verdicts[i] for i in seen], [self.verified_by[i] for i in seen])
        self.round = []
        for i, (_, accepted) in verdicts.items():
            self.pauses.verdict(i, accepted)

    def _laws(self, live: list[int], logits: torch.Tensor) -> torch.Tensor:
        """The sampling law of every row [n, N, V] of the first n slots (filters, one-hots where slots ask)."""
        s, n = self.slots, logits.shape[0]
        return filtered_probs(logits, s.temperature[:n], s.top_k[:n], s.top_p[:n], s.filters(live))

    def consume(self, live: list[int], row_logits: RowLogits) -> torch.Tensor:
        s, N, M = self.slots, self.N, self.M
        mask, self.ends = s.mask(live), None
        if len(self.paused) == len(live):
            nxt = self.sample(self.paused, row_logits.rows(0, 1)[:, 0])
            n_commit = self.counts(mask, 1)
            s.emit(nxt[:, None], n_commit)
            self.pending = torch.where(mask, nxt, self.pending)
            self.have = torch.where(mask, 0, self.have)  # drafts made before these steps are stale
            return n_commit
        drafting = [i for i in live if i not in self.paused] if self.paused else live
        self.verified_by = list(self.made_by)
        for i in drafting:
            self.made_by[i] = EVERY if self.every else self.m
        held = self.held
        dmask = mask if held is None else mask & ~held
        # One MASK group (last): the LM head runs once, over every row (a second pass over the largest matrix of a
        # real model would cost more than the extra rows). A group per acceptance point: the same while the rows
        # are few and cheap (``ONE_PASS_ROWS``; AMX, bf16, 49,152 x 576: 25 rows 1.5 ms, 5 + 4 rows in two passes
        # 2.5 ms), else the clean rows, then the kept group. A draft vocabulary: the drafts' head is a pass of its own.
        m, short, L = self.m, self.short, self.layout  # this round's drafts and MASK rows (M, or fewer if paced)
        greedy = s.all_greedy(drafting)
        branch, hit = self.every and L.branch, None
        if self.every:
            whole_pass = not short and row_logits.covered * L.rows <= self.one_pass_rows
            head = (0, L.rows) if whole_pass else (0, L.clean)
        else:
            whole_pass = not short
            head = (0, 1 + 2 * m) if whole_pass else (0, 1 + m)
        v, cold = self.v, self.v == 0  # the drafts verified (0: a cold round)
        policy = self.options.draft_policy
        # Greedy decoding needs no laws: a draft passes iff it is the argmax (speculative sampling with one-hot
        # p and q), so no vocabulary-sized tensor is built per round, and none is padded to every slot.
        if greedy:
            picks = row_logits.picks(*head)  # [S, N] or [S, 1 + 2m]
            target = picks[:, :1 + m]
            verified = torch.arange(m, device=s.device) < v[:, None]
            accepted = ((self.drafts[:, :m] == target[:, :m]) & verified).long().cumprod(-1).sum(-1)
            nxt = target.gather(1, accepted[:, None])[:, 0]
            after = picks[:, N] if branch else None  # the branch row's token (its law's draw, sampled)
        else:
            whole = row_logits.covered_rows(*head)  # laws only for the slots the forward covered, not idle ones
            n, V = whole.shape[0], whole.shape[-1]
            if self.q is None:
                self.q = torch.zeros(s.num_slots, M, V, device=s.device)
            p = self._laws(drafting, whole[:, :1 + m])  # the target law of each draft and the bonus
            exact = policy != "argmax_truncated"
            # The first v drafts, exactly (a cold row: v = 0, a draw from its pending row's law).
            accepted, nxt = s.per_generator(
                drafting, lambda p_, q_, d_, v_, g: speculative_verify(p_, q_, d_, g, exact=exact, verified_B=v_),
                p, self.q[:n, :m], self.drafts[:n, :m], v[:n])
            after = s.per_generator(drafting, lambda p_, g: draw(p_, g), self._laws(drafting, whole[:, N:N + 1])
                                    )[:, 0] if branch else None
        if held is not None:  # (sampled sequences only: ``plan``) their one token, drawn as a causal step draws it
            accepted = torch.where(held, torch.zeros_like(accepted), accepted)
            nxt = torch.where(held, self.sample(self.paused, row_logits.rows(*head)[:, 0]), nxt)
        if branch:  # the first draft failed for the branch's token: its row is causal (not in cold rounds: stale)
            hit = (accepted == 0) & (nxt == self.second) & dmask & ~cold
        n_commit = self.counts(mask, accepted + 1 + (0 if hit is None else hit.long()))

        # The MASK rows draft the tokens after next (shifted logits): the group after all clean rows, or (every)
        # the group seeded after the accepted prefix.
        at = L.kept(accepted, hit) if self.every else (1 + v)[:, None] + torch.arange(m, device=s.device)
        if greedy and not branch:
            d_new, q_new = (picks.gather(1, at) if whole_pass else row_logits.draft_picks_at(at, short) if short
                            else row_logits.picks_at(at)), None
        else:
            n = row_logits.covered
            draft_logits = (take_rows(row_logits.covered_rows(*head), at[:n]) if whole_pass else
                            row_logits.draft_at(at, short)[:n] if short else row_logits.at(at)[:n])
            if greedy:
                d_new, q_new = pad_slots(argmax(draft_logits), s.num_slots), None
            elif policy == "exact_truncated":
                q_new = self._laws(drafting, draft_logits)
                d_new = s.per_generator(drafting, lambda q_, g: draw(q_, g), q_new)
            else:
                d_new = pad_slots(argmax(draft_logits), s.num_slots)
                q_new = F.one_hot(d_new[:n], V).float()
            if branch:  # the next branch token: the first draft row's likeliest token other than its draft
                top = pad_slots(draft_logits[:, 0].topk(2, dim=-1).indices, s.num_slots)
                second = torch.where(top[:, 0] == d_new[:, 0], top[:, 1], top[:, 0])
                self.second = torch.where(dmask, second, self.second)

        emitted = torch.cat([self.drafts[:, :m], nxt[:, None]], dim=1).scatter(1, accepted[:, None], nxt[:, None])
        if hit is not None:  # the correction (the branch token), then the branch row's token; the cache commits both
            emitted[:, 1] = torch.where(hit, after, emitted[:, 1])
            self.ends = torch.where(hit, N, -1)
            nxt = torch.where(hit, after, nxt)
        end = s.emit(emitted, n_commit, ends=bool(self.options.pause))
        s.drafted += self.counts(dmask, v)
        s.accepted += self.counts(dmask, accepted)
        if self.options.pause:  # per verifying slot: accepted + (M + 1) x verified, one number for the sync
            # Drafts past the token that ended the output (a stop token, the length limit) count as rejected:
            # they commit nothing, and the pacer would otherwise rate long rounds by them at every answer's end.
            useful = torch.minimum(accepted, end + 1)
            self.verdict = torch.where(dmask & ~cold, useful + (M + 1) * v, -1)

        # The MASK rows' drafts are valid for the next round after a cold round or a full acceptance of the
        # verified drafts (they assumed exactly the context that was committed); a rejection sends the row to a
        # cold round, unless every acceptance point had its own group. A paused sequence has none.
        fresh = torch.full_like(v, m) if self.every else torch.where(accepted == v, m, 0)
        if held is not None:
            fresh = torch.where(held, 0, fresh)
        self.have = torch.where(mask, fresh, self.have)
        kept = torch.where(dmask[:, None], d_new, self.drafts[:, :m])
        self.drafts = kept if m == M else torch.cat([kept, self.drafts[:, m:]], dim=1)
        if q_new is not None:
            self.q[:n, :m] = torch.where(dmask[:n, None, None], q_new, self.q[:n, :m])
        self.pending = torch.where(mask, nxt, self.pending)
        return n_commit
