"""When drafting pays, and how many drafts: AR-Trust's rounds against causal steps, on the wall clock.

A drafting round costs more than a causal step (m draft rows and m MASK rows per sequence) and pays only when
enough drafts are accepted; how much more it costs depends on the model, the batch and the machine (on a CPU
from 1.2x to 2.2x, benchmarks/README.md), and how many of its drafts are accepted depends on the text. For a
lane whose sequences are all greedy, whose tokens are the causal ones whatever kind of round produced them (and
one whose sampled sequences draw from no seeded stream: their tokens follow the causal law whatever kind of round
produced them, below), the pacer picks each round's kind: a number of drafts m (and MASK rows) from the lane's
longest down to 1, the longest with a MASK group per acceptance point (``EVERY``: no cold rounds, many more
rows), or a causal step (``CAUSAL``, 0).

It picks the kind with the fewest seconds per committed token, the quotient of two estimates:

- **seconds per covered slot** in a round of the kind: each round is timed from one plan to the next, over the
  slots its forward covers (up to its last live one: a forward's cost follows them, not how many of them are
  live, and every kind's round over the same slots serves the same sequences), and a kind's cost is the median of
  its last ``WINDOW`` timed rounds, so that a burst of load from elsewhere (a shared CPU: rounds of the same kind
  8-26 ms on the demo model) does not decide for long which kind wins. Every kind is timed in trials; a length
  not timed yet has its cost read off the straight line through the timed lengths'. Only the running kind is
  timed often, so the other kinds' costs are scaled by how its cost moved since they were timed (``level``).
  (Per live sequence, the costs of one kind at 8 slots spread 8-63 ms on SmolLM2, as answers ended in lower slots.)
- **tokens per sequence** in a round of m drafts, from the acceptance the lane observed at each draft position
  (draft k accepted, given drafts 1 .. k-1 were): a round commits 1 + sum_k prod_{j<=k} alpha_j tokens in
  expectation, and with one MASK group a round that rejects a draft leaves its sequence a cold round (one token,
  fresh drafts), which the expected rate includes (``EVERY`` has none). Acceptance is counted per kind of the
  round whose MASK rows made the drafts, after a prior of every kind's counts (``KIND_PRIOR`` sequences' worth):
  a shorter group's drafts are not a longer group's cut short (converted SmolLM2, batch 1, each kind pinned: draft
  2 passed after draft 1 in 86% of rounds drafted by groups of two, 76% of three, 69% of four; pooled, the pacer
  rated three drafts by four's and ran four, 3-4% slower). The rate is stationary, over
  endless answers. On the converted SmolLM2 at batch 1 (answers of about 11 tokens after the prefill's) it
  expected 2.3 tokens per round for four drafts with one group and 3.14 for ``EVERY``, measured 2.56 and 2.95:
  the first is the acceptance it learned (mostly from ``EVERY`` rounds; this formula on the acceptance measured
  in one-group rounds gives 2.56), the second the answers' ends (a round's drafts past an answer's end commit
  nothing: about one token per answer). Counting each answer round by round (a warm first round, the last one
  cut at the mean answer length) gives 2.89-2.99 for ``EVERY`` but 2.35 for one group, so it was not adopted;
  the two kinds' seconds per token were within 4% there either way. What the lane reports does see them: drafts
  accepted past the token that ended an output count as rejected (they commit nothing), so a longer length is
  not rated by the drafts it wastes at every answer's end (converted SmolLM2, 64 speed prompts, batch 1: three
  drafts in 38-49% of the pacer's rounds in two counted runs, against 2% in four of five before; tokens/s within
  noise, 1.81-1.90x causal in five runs against 1.73-2.02x).

Costs depend on how many slots a round's forward covers (on the demo model a causal step costs each of 16
sequences far less than it costs one alone; a forward covers the slots up to its last live one), so they are
kept per **size class** of the forwards (1, 2, 3-4, 5-8, 9-16, ... slots), each with its own choice and trials;
acceptance, a property of the text, is shared. Without the classes a lane that had learned its costs at 16
sequences (the demo's evaluation) then served one request at a time on them: AR-Trust 1.08-1.23x causal there
instead of 1.32-1.34x with a fresh pacer.

The kinds not running are tried in turn for a few rounds now and then: a trial that confirms the fastest kind
doubles the rounds until the next one (up to ``LONGEST``), a switch between drafting and causal steps brings them
back to ``GAP``, so a clear winner costs few trials and a close race is watched closely. A kind estimated at more
than ``HOPELESS`` times the running kind's seconds per token is not tried until ``LONGEST`` rounds have passed since
its last trial; a length not timed yet is estimated off the timed lengths' line, so it needs no trial to be ranked
(the demo model alone: one draft, about 1.4x three drafts' seconds per token, gets no trial in its first 256 rounds,
causal steps, about 1.6x, their first only). The first round after a switch is not timed: a drafting stint after
causal steps starts with a cold round whose cost is paid once per switch, not per round. A batch with a seeded
sampled sequence is not paced: that request's random draws would then depend on the clock (it keeps the
per-sequence pause, ``ArTrustOptions.pause``, which depends on its own verdicts only). Unseeded sampled sequences
draw from the process's stream, which promises no reproducible tokens: their batches are paced, by a pacer of
their own (their drafts pass less often than greedy ones, and their rounds build laws over the vocabulary).
"""

from __future__ import annotations

import statistics
import time
from collections import deque

CAUSAL = 0  # a kind is the number of drafts a round verifies and makes; 0: a causal step
EVERY = -1  # the longest, with a MASK group after each acceptance point


def size_class(sequences: int) -> int:
    """The size class of a forward over this many slots: 1, 2, 3-4, 5-8, 9-16, ... -> 0, 1, 2, 3, 4, ..."""
    return (max(sequences, 1) - 1).bit_length()


class _Race:
    """The kinds' timed costs at one size class of batches, and which kind runs and is tried there."""

    def __init__(self, kinds: tuple[int, ...], window: int, gap: int, first: int | None = None) -> None:
        self.cost: dict[int, deque[float]] = {k: deque(maxlen=window) for k in kinds}  # s per covered slot
        # The machine's speed when each cost was timed (None: unknown, or timed as the running kind), and what
        # each kind that ran costs at speed 1 (``Pacer.level``).
        self.levels: dict[int, deque[float | None]] = {k: deque(maxlen=window) for k in kinds}
        self.nominal: dict[int, float] = {}
        self.best = kinds[0] if first is None else first
        self.trial_left = 0
        self.trying = self.best
        self.turn = 0  # which of the other kinds the next trial tries, in turn
        self.since = 0
        self.gap = gap  # rounds between trials
        self.trialled = False  # a trial ran since the last comparison
        self.rounds = 0  # rounds chosen at this class
        self.tried: dict[int, int] = {}  # the round each kind's last trial started at


class Pacer:
    TRIAL = 3  # rounds of another kind per trial (the first untimed)
    FIRST = 8  # rounds of the first kind before each kind not yet timed gets its first trial
    GAP = 16  # rounds of the faster kind between trials, at first and after a switch between drafting and causal
    LONGEST = 256  # the most rounds between trials, after trials that kept confirming the faster kind
    WINDOW = 7  # a kind's timed rounds its cost is the median of
    WIDE = 3  # slots from which a size class starts with a short length (``_first``)
    KEEP_SEEN = 0.97  # of the acceptance counts per verify round
    PRIOR = 2.0  # sequences' worth of a draft position's prior
    KIND_PRIOR = 8.0  # sequences' worth of every kind's acceptance in a kind's own
    HOPELESS = 1.25  # a kind estimated this many times the running kind's seconds per token gets no trials

    def __init__(self, longest: int, lengths: tuple[int, ...] | None = None, every: bool = False,
                 every_slots: int | None = None) -> None:
        """``longest``: the most drafts a round holds; ``lengths``: the kinds with one MASK group (default
        1 .. longest); ``every``: ``EVERY`` is a kind too, in rounds whose forward covers at most ``every_slots``
        slots (None: at any batch). The first kind is the first one run."""
        self.longest = longest
        lengths = range(1, longest + 1) if lengths is None else lengths
        self.kinds = tuple(sorted(lengths, reverse=True)) + ((EVERY,) if every else ()) + (CAUSAL,)
        self.every_slots = every_slots
        self.narrow = tuple(k for k in self.kinds if k != EVERY)  # the kinds past ``every_slots``
        self.tested = [0.0] * (longest + 1)  # [k]: rounds x sequences that verified draft k after k-1 passed
        self.passed = [0.0] * (longest + 1)  # [k]: ... and accepted it
        # The same per kind of the round whose MASK rows made the drafts: a shorter group's drafts are not a
        # longer group's cut short.
        self.made = {k: ([0.0] * (longest + 1), [0.0] * (longest + 1)) for k in self.kinds if k != CAUSAL}
        # Per size class of the rounds' batches: costs, choice and trials; ``race`` is the class of the round
        # chosen last.
        self.races: dict[int, _Race] = {}
        self.race, self.size = _Race(self.kinds, self.WINDOW, self.GAP), None
        # The timed round in flight: its kind, start, size class (its race) and the slots its forward covers.
        self.open: tuple[int, float, _Race, int] | None = None
        self.last: int | None = None

    def _enter(self, size: int) -> None:
        """Make size class ``size`` the current one."""
        if self.size is None:
            self.races[size] = self.race
            if not any(self.race.cost.values()):
                self.race.best = self._first(size)
        elif size not in self.races:
            self.races[size] = _Race(self.kinds, self.WINDOW, self.GAP, self._first(size))
        self.race, self.size = self.races[size], size

    def _first(self, size: int) -> int:
        """The kind a size class starts with, before any of its trials: a group per acceptance point where it is a kind
        at that size (no cold rounds; the demo model alone, 16 prompts pinned: 2.86 tokens a round against one group's
        2.59 at 1.13x its cost, within 3% a token), else the longest length up to ``WIDE`` - 1 slots and a short one
        (half the longest) from ``WIDE`` slots, where every draft costs a row per sequence (converted SmolLM2, bf16, 8
        slots, an EPYC without AMX: rounds of 1 or 2 drafts 1.07-1.09x causal tokens/s, of 3 0.92x; a class that started
        with the longest ran 0.83-0.95x over 16 prompts, 0.92-1.06x starting short). Where its rows cost more than it
        gains, the class's first trials move it off."""
        smallest = 1 if size == 0 else 2 ** (size - 1) + 1
        allowed = EVERY in self.kinds and (self.every_slots is None or smallest <= self.every_slots)
        short = max(1, self.longest // 2)
        if allowed:
            return EVERY
        return short if smallest >= self.WIDE and short in self.kinds else self.kinds[0]

    def prefers_causal(self, covered: int) -> bool:
        """Whether causal steps are what forwards over ``covered`` slots run now (their size class's choice
        between trials; False for a class not seen yet, which starts drafting)."""
        return self.current(covered) == CAUSAL

    def current(self, covered: int) -> int:
        """The kind forwards over ``covered`` slots run now: their size class's choice between trials, or the
        kind an unseen class starts with (``_first``)."""
        size = size_class(covered)
        race = self.races.get(size)
        return race.best if race is not None else self._first(size)

    @property
    def cost(self) -> dict[int, deque[float]]:
        """Seconds per covered slot of each kind's last timed rounds, at the current size class."""
        return self.race.cost

    @property
    def best(self) -> int:
        """The kind that runs between trials at the current size class."""
        return self.race.best

    @property
    def gap(self) -> int:
        """Rounds between trials at the current size class."""
        return self.race.gap

    # ------------------------------------------------------------------------------------------ estimates
    def observe(self, verdicts: list[tuple[int, int]], makers: list[int] | None = None) -> None:
        """One verify round's (drafts verified, drafts accepted) per sequence that verified any, and the kind of
        the round whose MASK rows made each sequence's drafts (``makers``; None: not known). Every position's
        counts fade per round, seen or not: a position the running length does not reach drifts back to its
        prior, so a longer length is tried again once what was seen of it grows old."""
        for tested, passed in [(self.tested, self.passed), *self.made.values()]:
            tested[:] = [self.KEEP_SEEN * n for n in tested]
            passed[:] = [self.KEEP_SEEN * n for n in passed]
        for j, (verified, accepted) in enumerate(verdicts):
            own = self.made.get(makers[j]) if makers is not None else None
            for tested, passed in [(self.tested, self.passed)] + ([own] if own else []):
                for k in range(1, min(verified, accepted + 1) + 1):
                    tested[k] += 1
                    passed[k] += accepted >= k

    def acceptance(self, k: int, kind: int | None = None) -> float:
        """Draft k's chance to pass once drafts 1 .. k-1 have: what was seen, after a prior worth ``PRIOR``
        sequences at draft k-1's chance (a draft further ahead taken as good as the one before it until seen;
        one half for the first). With ``kind``: of the drafts that rounds of that kind made, after a prior worth
        ``KIND_PRIOR`` sequences at the chance seen of every kind's."""
        return self._chances(k, kind)[-1]

    def _chances(self, n: int, kind: int | None = None) -> list[float]:
        out, prior = [], 0.5
        for k in range(1, n + 1):
            prior = (self.passed[k] + self.PRIOR * prior) / (self.tested[k] + self.PRIOR)
            out.append(prior)
        if kind in self.made:
            tested, passed = self.made[kind]
            out = [(passed[k] + self.KIND_PRIOR * c) / (tested[k] + self.KIND_PRIOR) for k, c in enumerate(out, 1)]
        return out

    def tokens(self, kind: int) -> float:
        """Expected tokens a sequence commits per round, over a run of rounds of ``kind``."""
        run, extra = 1.0, 0.0  # the chance all drafts so far passed; the expected accepted drafts
        for chance in self._chances(self.longest if kind == EVERY else kind, kind):
            run *= chance
            extra += run
        if kind in (CAUSAL, EVERY):
            return 1.0 + extra
        # A warm round commits 1 + extra tokens and, unless every draft passed (chance ``run``), leaves a cold
        # round of one token after it: over many rounds, (1 + extra + (1 - run)) tokens per (2 - run) rounds.
        return (2.0 + extra - run) / (2.0 - run)

    def level(self, race: _Race | None = None) -> float | None:
        """How slow the machine is now, in the units of the size class's first timed kind: the running kind's last
        costs over what it costs at level 1 (None before it is known). A shared CPU's speed drifts by more than the
        kinds differ (converted SmolLM2, batch 1, every kind 20% slower within a minute), while only the running
        kind is timed often: each other kind's costs, timed in its trials, are scaled by how the level moved since."""
        r = race or self.race
        costs = r.cost[r.best]
        return statistics.median(costs) / r.nominal[r.best] if costs and r.best in r.nominal else None

    def _timed(self, kind: int) -> float | None:
        """The median of ``kind``'s timed costs, each scaled to the machine's level now."""
        costs, levels, now = list(self.cost[kind]), list(self.race.levels[kind]), self.level()
        if not costs:
            return None
        if now is not None and kind != self.best:
            skip = len(costs) - len(levels)  # costs set from outside have no level: taken as they are
            costs = [c * now / lv if i >= skip and (lv := levels[i - skip]) else c for i, c in enumerate(costs)]
        return statistics.median(costs)

    def _switch(self, race: _Race, kind: int) -> None:
        """Make ``kind`` the running kind: its costs, scaled to the level now, become its window; the kind it
        replaces keeps its costs at the level they were timed at."""
        old, now, scaled = race.best, self.level(race), self._timed(kind)
        if now is not None and scaled is not None:
            race.nominal[kind] = scaled / now
            race.cost[kind] = deque([scaled] * len(race.cost[kind]), maxlen=race.cost[kind].maxlen)
            race.levels[old] = deque([now] * len(race.cost[old]), maxlen=race.levels[old].maxlen)
        race.levels[kind].clear()
        race.best = kind

    def seconds(self, kind: int) -> float | None:
        """Seconds per covered slot in a round of ``kind``: timed (at the machine's level now, ``level``), or for
        an untimed length (one MASK group), on the line through the timed lengths (None while nothing to read it
        from)."""
        if self.cost[kind]:
            return self._timed(kind)
        if kind <= 0:
            return None
        timed = [(k, self._timed(k)) for k in self.kinds if k > 0 and self.cost[k]]
        if len(timed) < 2:
            return None
        (k0, c0), (k1, c1) = timed[-1], timed[0]  # the shortest and the longest timed
        return max(c0 + (c1 - c0) * (kind - k0) / (k1 - k0), 0.0)

    def rate(self, kind: int) -> float | None:
        """Seconds per committed token of ``kind`` (None before it can be estimated)."""
        seconds = self.seconds(kind)
        return None if seconds is None else seconds / self.tokens(kind)

    # --------------------------------------------------------------------------------------------- choice
    def _hopeful(self, race: _Race, others: list[int], rates: dict[int, float | None]) -> list[int]:
        """The kinds worth a trial: those not estimated yet, those whose estimated seconds per token are within
        ``HOPELESS`` of the running kind's (a length not timed yet is estimated off the line through the timed
        ones, ``seconds``, so once two lengths are timed the rest need no trial of their own to be ranked), and
        those not tried for ``LONGEST`` rounds (an estimate timed once, under load, is not trusted for good)."""
        best = rates.get(race.best)
        if best is None:
            return others
        return [k for k in others if rates[k] is None or rates[k] <= self.HOPELESS * best
                or race.rounds - race.tried.get(k, 0) > self.LONGEST]

    def skip(self) -> None:
        """Do not time the round in flight (an admission's prefill ran inside it, or it was not paced)."""
        self.open = None

    def next(self, sequences: int, covered: int | None = None) -> int:
        """The kind of the next round, which serves ``sequences`` sequences over ``covered`` slots (its forward runs
        up to its last live one; default: ``sequences``): it is chosen among that size class's kinds and costs.
        The round in flight, if timed, ends here and counts in the class it ran in."""
        now = time.perf_counter()
        if self.open is not None:
            kind, start, race, width = self.open
            race.cost[kind].append((now - start) / width)
            if kind == race.best:
                race.nominal.setdefault(kind, race.cost[kind][0])  # the class's first timed kind: level 1
            else:
                race.levels[kind].append(self.level(race))
        covered = covered or sequences
        self._enter(size_class(covered))
        r = self.race
        r.rounds += 1
        kinds = self.kinds if self.every_slots is None or covered <= self.every_slots else self.narrow
        if r.trial_left and r.trying not in kinds:
            r.trial_left = 0
        if r.trial_left:
            r.trial_left -= 1
            kind = r.trying
        else:
            rates = {k: self.rate(k) for k in kinds}
            known = [k for k in kinds if rates[k] is not None]
            fastest = min(known, key=lambda k: rates[k]) if known else (r.best if r.best in kinds else kinds[0])
            switch = fastest != r.best and (r.best not in kinds or rates[r.best] is not None)
            if switch and (fastest == CAUSAL) != (r.best == CAUSAL):  # drafting stopped or started paying:
                r.gap = self.GAP  # watch closely
            elif r.trialled and not switch:  # a trial confirmed the faster kind: the next one later
                r.gap = min(2 * r.gap, self.LONGEST)
            if switch:
                self._switch(r, fastest)
            r.trialled = False
            r.since += 1
            others = self._hopeful(r, [k for k in kinds if k != r.best], rates)
            untried = [k for k in others if rates[k] is None]
            if others and r.since > (self.FIRST if untried else r.gap):
                r.trying = untried[0] if untried else others[r.turn % len(others)]
                r.turn += not untried
                r.since, r.trial_left, r.trialled = 0, self.TRIAL - 1, True
                r.tried[r.trying] = r.rounds
                kind = r.trying
            else:
                kind = r.best
        # Timed unless it is the first of its kind in a row (a drafting stint after causal steps starts cold).
        self.open = (kind, now, r, covered) if kind == self.last else None
        self.last = kind
        return kind
