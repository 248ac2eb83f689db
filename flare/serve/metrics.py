"""Prometheus metrics of one server: requests, tokens, tokens per forward, acceptance, queue, step latency."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from flare.engine import Engine, RequestOutput


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.registry = r = CollectorRegistry()
        self.requests = Counter("flare_requests", "Requests ended, by mode and outcome", ["mode", "outcome"],
                                registry=r)
        self.tokens = Counter("flare_generated_tokens", "Committed tokens, by mode", ["mode"], registry=r)
        self.prompt_tokens = Counter("flare_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.rejected = Counter("flare_rejected_requests", "Requests refused, by reason", ["reason"], registry=r)
        self.step_latency = Histogram("flare_step_seconds", "Engine step latency", registry=r,
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.waiting = Gauge("flare_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("flare_running_requests", "Requests decoding in a slot", registry=r)
        self.tpf = Gauge("flare_tokens_per_forward", "Finished requests' tokens per forward they took part in",
                         registry=r)
        self.acceptance = Gauge("flare_draft_acceptance_rate", "AR-Trust accepted drafts / drafted", registry=r)
        self.kernels = Info("flare_kernel_path", "The kernel each layer kind ran last", registry=r)

    def on_step(self, outputs: list[RequestOutput], seconds: float) -> None:
        """(engine thread, every step) Counts per mode summed first: one counter update per mode a step."""
        self.step_latency.observe(seconds)
        tokens: dict[str, int] = {}
        for out in outputs:
            if out.new_token_ids:
                mode = out.sequence.mode
                tokens[mode] = tokens.get(mode, 0) + len(out.new_token_ids)
            if out.finished:
                self.requests.labels(out.sequence.mode, out.finish_reason or "stop").inc()
        for mode, n in tokens.items():
            self.tokens.labels(mode).inc(n)

    def render(self) -> bytes:
        e = self.engine
        stats = e.stats
        self.waiting.set(e.num_waiting)
        self.running.set(e.num_running)
        self.tpf.set(stats.finished_tokens / stats.active_forwards if stats.active_forwards else 0.0)
        self.acceptance.set(stats.accepted / stats.drafted if stats.drafted else 0.0)
        self.kernels.info({k: str(v) for k, v in e.model.kernel_paths().items()})
        return generate_latest(self.registry)
