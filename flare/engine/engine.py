"""The serving engine on token ids: requests in, committed tokens out, one batched forward per step.

``add_request`` validates and queues a request; ``step`` admits waiting requests into free cache slots (one
prefill forward), runs one forward over every running sequence whatever its mode (``flare.engine.stepper``,
the same lanes ``decode`` runs), and reports each sequence's newly committed tokens; ``abort`` drops a request
and frees its slot. Text never appears here: ``flare.engine.llm`` does that.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from flare.decoding import ModeOptions, SamplingParams, as_options, check_request, parse_mode
from flare.engine.compiled import keeps_graphs
from flare.engine.prefix_cache import PrefixCache
from flare.engine.scheduler import QueueFull, Scheduler, SchedulerConfig
from flare.engine.sequence import Sequence, SequenceStatus
from flare.engine.stepper import Admission, Stepper
from flare.model import FlareModel


class RequestError(ValueError):
    """A request the engine refuses as given (the server answers 400 with this message)."""


@dataclass
class EngineConfig:
    max_num_seqs: int = 16  # sequences decoding at once (cache slots)
    max_waiting: int = 256  # queued requests beyond those; more are refused (QueueFull -> 429)
    max_prefill_tokens: int = 4096  # prompt tokens admitted per step
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 4096
    default_mode: str = "causal"  # for requests that name none: a mode, with optional :key=value options
    # MiB of prompt beginnings' states kept for later prompts that start with them (flare.engine.prefix_cache);
    # 0: none kept
    prefix_cache_mb: int = 256

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_prompt_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0, got {self.prefix_cache_mb}")
        self.default_options = parse_mode(self.default_mode)


GRAPHED_CAPACITY = 1024  # KV slots of a graphed engine's cache from the start (``Engine``)


@dataclass
class RequestOutput:
    """What one step did for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    sequence: Sequence = field(repr=False)


@dataclass
class EngineStats:
    steps: int = 0
    forwards: int = 0
    step_seconds: float = 0.0  # of the last step
    tokens: int = 0  # committed tokens, all requests
    drafted: int = 0
    accepted: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    active_forwards: int = 0  # sum over finished requests of the forwards each took part in
    finished_tokens: int = 0  # tokens of finished requests (tokens per forward = this / active_forwards)
    prefix_hits: int = 0  # admissions that started from a kept prompt beginning (flare.engine.prefix_cache)
    prefix_tokens: int = 0  # prompt tokens those did not prefill


class Engine:
    def __init__(self, model: FlareModel, config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        self.config = config or EngineConfig()
        c = self.config
        self.scheduler = Scheduler(SchedulerConfig(c.max_num_seqs, c.max_waiting, c.max_prefill_tokens))
        prefix = PrefixCache(c.prefix_cache_mb << 20, model.config.has_linear_attention) if c.prefix_cache_mb else None
        # Where forwards replay graphs kept per cache capacity, the cache starts at one that holds a chat request
        # and its answer, so the warm-up's graphs are the ones served (a doubling compiles them all again).
        capacity = GRAPHED_CAPACITY if keeps_graphs(model) else 256
        self.stepper = Stepper(model, c.max_num_seqs, capacity=capacity, prefix=prefix)
        self.stats = EngineStats()
        self._ids = itertools.count()

    # ---------------------------------------------------------------------------------------------- requests
    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        mode: str | ModeOptions | None = None,
        request_id: str | None = None,
    ) -> Sequence:
        """Validate and queue a request; ``mode``: options, their ``mode:key=value`` text, or None for the
        configured default. Raises RequestError for a bad request, QueueFull when the queue is at its limit."""
        try:
            options = check_request(self.model.config, [prompt_ids], as_options(mode, self.config.default_options))
        except ValueError as e:
            raise RequestError(str(e)) from None
        if len(prompt_ids) > self.config.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                               f"{self.config.max_prompt_tokens}")
        if params.max_new_tokens > self.config.max_new_tokens:
            raise RequestError(f"max_tokens {params.max_new_tokens} is above this server's limit "
                               f"{self.config.max_new_tokens}")
        request_id = request_id or f"req-{next(self._ids)}"
        seq = Sequence(request_id, list(prompt_ids), params.max_new_tokens, options, params)
        seq.arrived = time.perf_counter()
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; its slot is free at once. False if it is unknown or already done."""
        seq = self.scheduler.running.get(request_id)
        slot = seq.slot if seq is not None else None
        if self.scheduler.abort(request_id) is None:
            return False
        if slot is not None:
            self.stepper.release(slot)
        self.stats.requests_aborted += 1
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def free_slots(self) -> int:
        return len(self.scheduler.free_slots)

    def reset_prefix_cache(self) -> None:
        """Forget every kept prompt beginning (``EngineConfig.prefix_cache_mb``): benchmarks time each run from
        none, as a fresh server would."""
        if self.stepper.prefix is not None:
            self.stepper.prefix.reset()

    # ---------------------------------------------------------------------------------------------- stepping
    def step(self) -> list[RequestOutput]:
        """Admit what fits, run one forward for every running sequence, report what each committed."""
        start = time.perf_counter()
        forwards = self.stepper.runner.forwards
        scheduled = self.scheduler.schedule()
        self.stepper.admit([
            Admission(seq.slot, seq.options, seq.prompt_ids, seq.params,
                      seq.params.generator(self.model.device))
            for seq in scheduled.admitted
        ])
        self.stepper.step()
        outputs = self._collect(scheduled.running)
        self.stats.steps += 1
        self.stats.forwards += self.stepper.runner.forwards - forwards
        if self.stepper.prefix is not None:
            self.stats.prefix_hits, self.stats.prefix_tokens = self.stepper.prefix.hits, self.stepper.prefix.reused
        self.stats.step_seconds = time.perf_counter() - start
        return outputs

    def _collect(self, running: list[Sequence]) -> list[RequestOutput]:
        """What the step committed for each running sequence, from the stepper's host mirrors (its one read)."""
        outputs, now = [], time.perf_counter()
        for seq in running:
            tokens, reason = self.stepper.output(seq.slot)
            e = self.stepper.emitted[seq.slot]
            new = seq.update(tokens, reason)
            if new and seq.first_token_at is None:
                seq.first_token_at, seq.first_output = now, len(new)
            if reason is not None:
                seq.finished_at = now
            self.stats.drafted += e.drafted - seq.drafted
            self.stats.accepted += e.accepted - seq.accepted
            seq.forwards, seq.drafted, seq.accepted = e.forwards, e.drafted, e.accepted
            self.stats.tokens += len(new)
            if reason is not None:
                self.stepper.release(seq.slot)
                self.scheduler.finish(seq)
                self.stats.requests_finished += 1
                self.stats.active_forwards += seq.forwards
                self.stats.finished_tokens += len(seq.output_ids)
            outputs.append(RequestOutput(seq.request_id, new, reason is not None, reason, seq))
        return outputs

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        mode: str | ModeOptions | None = None,
    ) -> list[Sequence]:
        """Run ``prompts`` to completion (queued beyond the slots, batched); the finished sequences in order."""
        seqs = []
        for p in prompts:
            while True:
                try:
                    seqs.append(self.add_request(p, params, mode))
                    break
                except QueueFull:
                    self.step()
        while any(s.status not in (SequenceStatus.FINISHED, SequenceStatus.ABORTED) for s in seqs):
            self.step()
        return seqs
