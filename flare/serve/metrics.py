"""Prometheus metrics of one server: requests, tokens, tokens per forward, acceptance, queue, step latency, time
to first token and time per output token (vLLM's TTFT and TPOT) per mode.

The engine's side (in its thread or its own process) sums each step into a ``Tally``; the server records it
and asks the engine for a ``snapshot`` of its gauges when /metrics is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest


@dataclass
class Tally:
    """What steps did, summed: their latencies, committed tokens per mode, requests ended (mode, reason), and the
    first outputs' and ended requests' latencies (mode, seconds)."""

    seconds: list[float] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    ended: list[tuple[str, str]] = field(default_factory=list)
    ttft: list[tuple[str, float]] = field(default_factory=list)
    tpot: list[tuple[str, float]] = field(default_factory=list)

    def add(self, outputs, seconds: float) -> None:
        """One engine step's ``RequestOutput``s."""
        self.seconds.append(seconds)
        for out in outputs:
            seq = out.sequence
            if out.new_token_ids:
                self.tokens[seq.mode] = self.tokens.get(seq.mode, 0) + len(out.new_token_ids)
                if len(seq.output_ids) == len(out.new_token_ids) and seq.ttft is not None:  # its first output
                    self.ttft.append((seq.mode, seq.ttft))
            if out.finished:
                self.ended.append((seq.mode, out.finish_reason or "stop"))
                if seq.tpot is not None:
                    self.tpot.append((seq.mode, seq.tpot))


def counts(engine) -> dict:
    """An engine's gauges but the kernel paths."""
    stats = engine.stats
    return {"waiting": engine.num_waiting, "running": engine.num_running,
            "tpf": stats.finished_tokens / stats.active_forwards if stats.active_forwards else 0.0,
            "acceptance": stats.accepted / stats.drafted if stats.drafted else 0.0,
            "prefix_tokens": stats.prefix_tokens}


def snapshot(engine) -> dict:
    """An engine's gauges, as /metrics shows them."""
    return {**counts(engine), "kernels": {k: str(v) for k, v in engine.model.kernel_paths().items()}}


class Metrics:
    def __init__(self, snapshot) -> None:
        """``snapshot``: a callable returning the engine's gauges (``flare.serve.metrics.snapshot``'s dict)."""
        self.snapshot = snapshot
        self.registry = r = CollectorRegistry()
        self.requests = Counter("flare_requests", "Requests ended, by mode and outcome", ["mode", "outcome"],
                                registry=r)
        self.tokens = Counter("flare_generated_tokens", "Committed tokens, by mode", ["mode"], registry=r)
        self.prompt_tokens = Counter("flare_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.rejected = Counter("flare_rejected_requests", "Requests refused, by reason", ["reason"], registry=r)
        latency = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.step_latency = Histogram("flare_step_seconds", "Engine step latency", registry=r, buckets=latency[:12])
        self.ttft = Histogram("flare_time_to_first_token_seconds", "Seconds from a request's arrival to its first "
                              "output, by mode", ["mode"], registry=r, buckets=latency)
        self.tpot = Histogram("flare_time_per_output_token_seconds", "A finished request's seconds per output "
                              "token after its first output, by mode", ["mode"], registry=r, buckets=latency[:10])
        self.waiting = Gauge("flare_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("flare_running_requests", "Requests decoding in a slot", registry=r)
        self.tpf = Gauge("flare_tokens_per_forward", "Finished requests' tokens per forward they took part in",
                         registry=r)
        self.acceptance = Gauge("flare_draft_acceptance_rate", "AR-Trust accepted drafts / drafted", registry=r)
        self.prefix_tokens = Gauge("flare_prefix_cache_tokens", "Prompt tokens started from a kept prompt "
                                   "beginning instead of prefilled (flare.engine.prefix_cache)", registry=r)
        self.kernels = Info("flare_kernel_path", "The kernel each layer kind ran last", registry=r)

    def record(self, tally: Tally) -> None:
        """Steps' sums: one counter update per mode."""
        for s in tally.seconds:
            self.step_latency.observe(s)
        for mode, n in tally.tokens.items():
            self.tokens.labels(mode).inc(n)
        for mode, reason in tally.ended:
            self.requests.labels(mode, reason).inc()
        for mode, seconds in tally.ttft:
            self.ttft.labels(mode).observe(seconds)
        for mode, seconds in tally.tpot:
            self.tpot.labels(mode).observe(seconds)

    def render(self) -> bytes:
        s = self.snapshot()
        self.waiting.set(s["waiting"])
        self.running.set(s["running"])
        self.tpf.set(s["tpf"])
        self.acceptance.set(s["acceptance"])
        self.prefix_tokens.set(s["prefix_tokens"])
        self.kernels.info(s["kernels"])
        return generate_latest(self.registry)
