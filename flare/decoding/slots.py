"""Per-slot request state shared by every decoding lane: sampling settings, random streams, output buffers.

A slot holds one sequence from admission to release. Row s of every tensor here belongs to slot s. Emission
(appending committed tokens, noticing stop tokens and the length limit) and random draws happen only here, so
every mode stops, truncates and samples the same way, in ``decode`` and in the serving engine alike.

Random streams: each slot draws from its request's generator (None: torch's global one). A draw only ever
touches the rows of the slots it is for, so a seeded request's stream, and hence its output, does not depend on
what else is in the batch.
"""

from __future__ import annotations

from typing import Callable

import torch

from flare.decoding.params import SamplingParams
from flare.ops.sampling import Filters

MASKS_KEPT = 256  # slot lists whose ``mask`` is kept (past it they are made again)


class SlotBatch:
    def __init__(self, num_slots: int, device: torch.device | str) -> None:
        S = num_slots
        self.num_slots, self.device = S, torch.device(device)
        self.temperature = torch.zeros(S, device=device)
        self.top_k = torch.zeros(S, dtype=torch.long, device=device)
        self.top_p = torch.ones(S, device=device)
        self.max_new = torch.zeros(S, dtype=torch.long, device=device)
        self.stops = torch.full((S, 1), -1, dtype=torch.long, device=device)
        self.out = torch.zeros(S, 1, dtype=torch.long, device=device)
        self.out_len = torch.zeros(S, dtype=torch.long, device=device)
        self.finished = torch.ones(S, dtype=torch.bool, device=device)
        self.active_forwards = torch.zeros(S, dtype=torch.long, device=device)
        self.drafted = torch.zeros(S, dtype=torch.long, device=device)
        self.accepted = torch.zeros(S, dtype=torch.long, device=device)
        self.params: list[SamplingParams | None] = [None] * S
        self.stop_lists: list[list[int]] = [[] for _ in range(S)]
        self.generators: list[torch.Generator | None] = [None] * S
        self.live: list[bool] = [False] * S  # host mirror: admitted and not finished (refreshed once per step)
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}  # ``mask``'s tensors by slot list (never written)

    # ------------------------------------------------------------------------------------------ admission
    def admit(self, slot: int, params: SamplingParams, stops: list[int], generator: torch.Generator | None,
              room: int) -> None:
        """Bind ``slot`` to a new sequence; ``room`` is the most tokens its mode emits in one step."""
        self.params[slot], self.stop_lists[slot], self.generators[slot] = params, list(stops), generator
        self.temperature[slot] = float(params.temperature)
        self.top_k[slot] = int(params.top_k)
        self.top_p[slot] = float(params.top_p)
        self.max_new[slot] = params.max_new_tokens
        width = params.max_new_tokens + room
        if width > self.out.shape[1]:
            self.out = torch.cat([self.out, self.out.new_zeros(self.num_slots, width - self.out.shape[1])], 1)
        if len(stops) > self.stops.shape[1]:
            self.stops = torch.cat([self.stops, self.stops.new_full((self.num_slots, len(stops) - self.stops.shape[1]),
                                                                    -1)], 1)
        self.stops[slot] = -1
        if stops:
            self.stops[slot, : len(stops)] = torch.tensor(stops, device=self.device)
        self.out_len[slot] = 0
        self.finished[slot] = False
        for counter in (self.active_forwards, self.drafted, self.accepted):
            counter[slot] = 0
        self.live[slot] = True

    def release(self, slot: int) -> None:
        self.params[slot], self.generators[slot], self.stop_lists[slot] = None, None, []
        self.finished[slot] = True
        self.live[slot] = False

    def mask(self, slots: list[int]) -> torch.Tensor:
        """[S] bool, True at ``slots``: one tensor per slot list, made once (a step asks for the same few several
        times; callers only read it)."""
        key = tuple(slots)
        m = self._masks.get(key)
        if m is None:
            if len(self._masks) >= MASKS_KEPT:
                self._masks.clear()
            m = torch.zeros(self.num_slots, dtype=torch.bool)  # host: indexed by a host list, then one copy
            m[slots] = True
            m = self._masks[key] = m.to(self.device)
        return m

    def all_greedy(self, slots: list[int]) -> bool:
        return all(self.params[s].greedy for s in slots)

    def seeded(self, slots: list[int]) -> bool:
        """Whether a sampled sequence among ``slots`` draws from a random stream of its own (a seeded request)."""
        return any(not self.params[s].greedy and self.generators[s] is not None for s in slots)

    def filters(self, slots: list[int]) -> Filters:
        """What ``slots`` filter by, for ``flare.ops.sampling.filtered_probs`` (which then sorts no vocabulary): the
        sampled ones' largest top-k, whether one without top-k has a top-p, and whether one is greedy."""
        sampled = [self.params[s] for s in slots if not self.params[s].greedy]
        return Filters(max((p.top_k for p in sampled), default=0),
                       any(p.top_k == 0 and p.top_p < 1.0 for p in sampled), len(sampled) < len(slots))

    # ------------------------------------------------------------------------------------------ emission
    def emit(self, tokens: torch.Tensor, n_emit: torch.Tensor, ends: bool = False) -> torch.Tensor | None:
        """Append the first n_emit[s] of tokens [S, K] to each slot's output (n_emit is 0 for slots not
        emitting); a stop token among them or reaching max_new finishes the slot. ``ends``: also return where
        each slot's output ends among them [S]: the index of the token that finished it (a stop token, or the
        one that reached max_new), K where none did; the tokens after it are cut from the output."""
        K = tokens.shape[1]
        steps = torch.arange(K, device=tokens.device)
        at = (self.out_len[:, None] + steps).clamp(max=self.out.shape[1] - 1)
        keep = steps < n_emit[:, None]
        self.out.scatter_(1, at, torch.where(keep, tokens, self.out.gather(1, at)))
        stop = (tokens[:, :, None] == self.stops[:, None, :]).any(-1) & keep
        end = None
        if ends:
            last = keep & (self.out_len[:, None] + steps + 1 >= self.max_new[:, None])
            end = torch.where(stop | last, steps, K).amin(1)
        self.out_len += n_emit
        self.finished |= stop.any(1) | (self.out_len >= self.max_new)
        return end

    def tokens(self, slot: int, out_row: list[int] | None = None, length: int | None = None
               ) -> tuple[list[int], str | None]:
        """Slot's output so far, cut after the first stop token and at max_new, and why it ended (None while it
        has not). ``out_row``/``length`` pass values already read from the device."""
        row = self.out[slot].tolist() if out_row is None else out_row
        n = int(self.out_len[slot]) if length is None else length
        row = row[:n]
        stops, max_new = self.stop_lists[slot], self.params[slot].max_new_tokens
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        if cut is not None and cut < max_new:
            return row[: cut + 1], "stop"
        if len(row) >= max_new:
            return row[:max_new], "length"
        return row, None

    # ------------------------------------------------------------------------------------------ sampling
    def per_generator(self, slots: list[int], fn: Callable, *args: torch.Tensor):
        """Run ``fn(*args_rows, generator)`` on the rows of ``slots`` grouped by random stream, and put the
        results (a tensor or a tuple of tensors, leading dim = rows) back at those rows of zero tensors of
        the full [S, ...] shape. Rows of other slots are never drawn for."""
        groups: dict[int, tuple[torch.Generator | None, list[int]]] = {}
        for s in slots:
            g = self.generators[s]
            groups.setdefault(id(g), (g, []))[1].append(s)
        if len(groups) == 1 and len(slots) == self.num_slots:
            return fn(*args, next(iter(groups.values()))[0])
        full = None
        for g, rows in groups.values():
            idx = torch.tensor(rows, device=self.device)
            res = fn(*(a[idx] for a in args), g)
            parts = res if isinstance(res, tuple) else (res,)
            if full is None:
                full = tuple(p.new_zeros(self.num_slots, *p.shape[1:]) for p in parts)
            for f, p in zip(full, parts):
                f[idx] = p
        if full is None:
            return None
        return full if isinstance(res, tuple) else full[0]
