"""The fixed-output wave protocol (method §4), against the in-process engine or any OpenAI-compatible server.

For each mode and concurrency C: one warm-up wave of C requests, then ``waves`` measured waves, each starting
when the previous one has finished. Every request asks for exactly ``max_tokens`` tokens with ``ignore_eos``;
a run counts only if every completion has exactly that length. Throughput = completion tokens of the measured
waves / their wall time. Tokens per forward comes from the server's ``flare`` counters when it reports them.
``until_eos`` measures answers as a user gets them instead: each ends at its EOS (``max_tokens`` caps it), so
the text after an answer, which a drafting mode predicts badly and nobody reads, is not timed; compare tokens/s
of servers that give the same answers (the same greedy model). Each run starts from no kept prompt beginnings
(``flare.engine.prefix_cache``; a server's ``POST /reset_prefix_cache``, where it has one): the modes and
concurrencies measured one after another send the same questions, which a later run would otherwise find kept.
Requests are greedy unless a target is given a ``temperature`` (and ``top_p``): then they sample, unseeded, as
an OpenAI client's requests do by default (AR-Trust's pacer then chooses their rounds as for greedy ones).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from flare.decoding import ModeOptions, SamplingParams, parse_mode
from flare.engine.llm import LLM

SERVER_DEFAULT = "server"  # a --modes entry that sends no mode: another server, or this one's default


def parse_targets(text: str) -> list[ModeOptions | None]:
    """``flare bench --modes``: ``parse_mode`` entries, and ``server`` (None) for the server's own default."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise ValueError("no modes given")
    return [None if e == SERVER_DEFAULT else parse_mode(e) for e in entries]


@dataclass
class WaveRun:
    mode: str
    concurrency: int
    max_tokens: int
    waves: int
    tokens: int
    seconds: float
    tokens_per_forward: float | None
    valid: bool  # every completion had exactly max_tokens tokens (until_eos: always)
    problem: str | None = None
    until_eos: bool = False
    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


class Target(Protocol):
    temperature: float  # of every request (0: greedy)
    top_p: float

    def wave(self, questions: list[str], mode: ModeOptions | None, max_tokens: int, ignore_eos: bool = True
             ) -> list[tuple[int, int | None]]:
        """Run the questions concurrently; per request (completion tokens, forwards or None)."""

    def reset(self) -> None:
        """Forget kept prompt beginnings, where the target can."""


class EngineTarget:
    """The in-process engine: a wave is C requests admitted together and stepped to the end."""

    def __init__(self, llm: LLM, temperature: float = 0.0, top_p: float = 1.0) -> None:
        self.llm, self.temperature, self.top_p = llm, temperature, top_p

    def wave(self, questions, mode, max_tokens, ignore_eos=True):
        prompts = [self.llm.chat_ids([{"role": "user", "content": q}]) for q in questions]
        params = SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=max_tokens,
                                ignore_eos=ignore_eos)
        return [(len(c.token_ids), c.forwards) for c in self.llm.generate(prompts, params, mode)]

    def reset(self) -> None:
        self.llm.engine.reset_prefix_cache()


class HttpTarget:
    """Any OpenAI-compatible server (chat completions). ``mode`` None sends no ``flare`` field (another
    server, or this one's default mode)."""

    def __init__(self, base_url: str, model: str | None = None, timeout: float = 600.0, temperature: float = 0.0,
                 top_p: float = 1.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout, self.temperature, self.top_p = timeout, temperature, top_p
        self.model = model or self._served_model()

    def _served_model(self) -> str:
        with urllib.request.urlopen(f"{self.base_url}/models", timeout=30) as r:
            return json.loads(r.read())["data"][0]["id"]

    def chat(self, question: str, mode: ModeOptions | None, max_tokens: int, ignore_eos: bool = True
             ) -> dict[str, Any]:
        """One chat completion (greedy unless the target samples); the server's JSON reply."""
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": question}],
                                "max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                                "ignore_eos": ignore_eos}
        if mode is not None:
            body["flare"] = mode.to_json()
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer none"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"HTTP {e.code}: {e.read()[:300]!r}") from None

    def reset(self) -> None:
        """``POST /reset_prefix_cache`` at the server's root (``flare serve``; vLLM's with
        ``VLLM_SERVER_DEV_MODE=1``); a server without it answers 404 or 405 and keeps its cache across runs, which
        favours it in a comparison of servers."""
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        req = urllib.request.Request(f"{root}/reset_prefix_cache", data=b"", method="POST")
        try:
            urllib.request.urlopen(req, timeout=30).close()
        except urllib.error.HTTPError as e:
            if e.code not in (404, 405):
                raise

    def _one(self, question: str, mode: ModeOptions | None, max_tokens: int, ignore_eos: bool
             ) -> tuple[int, int | None]:
        reply = self.chat(question, mode, max_tokens, ignore_eos)
        forwards = (reply.get("flare") or {}).get("forwards")
        return reply["usage"]["completion_tokens"], forwards

    def wave(self, questions, mode, max_tokens, ignore_eos=True):
        with cf.ThreadPoolExecutor(len(questions)) as pool:
            return list(pool.map(lambda q: self._one(q, mode, max_tokens, ignore_eos), questions))


def run_waves(target: Target, questions: list[str], mode: ModeOptions | None, concurrency: int, max_tokens: int,
              waves: int, warmup: int = 1, until_eos: bool = False) -> WaveRun:
    """``mode`` None sends no mode (the server's default); ``until_eos``: answers end at EOS (module doc)."""
    if concurrency < 1 or waves < 1 or max_tokens < 1:
        raise ValueError("concurrency, waves and max_tokens must be >= 1")
    if not questions:
        raise ValueError("no questions to send")

    def batch(i: int) -> list[str]:
        return [questions[(i * concurrency + j) % len(questions)] for j in range(concurrency)]

    target.reset()
    for w in range(warmup):
        target.wave(batch(w), mode, max_tokens, not until_eos)
    tokens, forwards, lengths, seconds = 0, 0, [], 0.0
    known = True
    for w in range(waves):
        start = time.perf_counter()
        out = target.wave(batch(warmup + w), mode, max_tokens, not until_eos)
        seconds += time.perf_counter() - start
        for n, f in out:
            tokens += n
            lengths.append(n)
            if f is None:
                known = False
            else:
                forwards += f
    bad = [n for n in lengths if n != max_tokens and not until_eos]
    problem = f"{len(bad)} completions were not {max_tokens} tokens long (e.g. {bad[0]})" if bad else None
    label = "server default" if mode is None else mode.label()
    return WaveRun(label, concurrency, max_tokens, waves, tokens, seconds,
                   tokens / forwards if known and forwards else None, not bad, problem, until_eos,
                   target.temperature, target.top_p)
