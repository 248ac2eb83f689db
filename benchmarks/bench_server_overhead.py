"""What `flare serve` costs on top of the engine: in-process vs HTTP tokens/s, interleaved, with a breakdown.

Per concurrency C (lowest first), rounds interleaved A-B-A-B: ``flare.engine.decode`` (C=1) and ``LLM.generate``
in this process, then the same greedy requests (``ignore_eos``, exactly ``--max-tokens`` tokens, causal unless
``--mode``) through a ``flare serve`` subprocess, non-streamed and streamed, one keep-alive connection per client
thread. Printed: median tokens/s, the ratios to the engine and to decode, and where the server's extra time
goes: per engine step, the time inside ``Engine.step`` (the server's from its /metrics) and outside it; then the
cost of each piece of the server's path, measured here with the server's own code. ``--profile FILE`` runs the
server under yappi (every thread, CPU clock) and writes its busiest functions to FILE.

On a busy machine, pass ``--threads 1``: an OpenMP team of 2 in this process's main thread can run 50x slower
when another process holds a core, and its spinning threads slow the server after it; ``--paths`` runs the
in-process and the HTTP paths in separate runs instead.

    python benchmarks/bench_server_overhead.py                  # the demo's FLARE model (trained if absent)
    python benchmarks/bench_server_overhead.py --model DIR --rounds 7 --waves 3 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench_serve  # the sibling script: how a flare serve subprocess is started

PROFILE_SERVER = r"""
import atexit, os, signal, sys, yappi
yappi.set_clock_type("cpu")
yappi.start(builtins=False)
def dump():
    if not yappi.is_running():
        return
    yappi.stop()
    with open(sys.argv[1], "w") as f:
        for t in yappi.get_thread_stats():
            f.write(f"== thread {t.name} ({t.ttot:.2f} s CPU)\n")
            for key in ("tsub", "ttot"):
                f.write(f"-- by {key}\n")
                for s in list(yappi.get_func_stats(filter={"ctx_id": t.id}).sort(key))[:30]:
                    f.write(f"  {s.tsub:8.3f} s self {s.ttot:8.3f} s total {s.ncall:8d} calls  "
                            f"{s.module.split('site-packages/')[-1]}:{s.lineno} {s.name}\n")
atexit.register(dump)
# uvicorn re-raises SIGTERM once it has shut down: dump, then exit. SIGUSR1: forget the start-up.
signal.signal(signal.SIGTERM, lambda *_: (dump(), os._exit(0)))
signal.signal(signal.SIGUSR1, lambda *_: yappi.clear_stats())
from flare.cli import main
sys.exit(main(sys.argv[2:]))
"""


def find_model(demo_out: str) -> str:
    """The demo's newest FLARE checkpoint; else its converted model (same architecture, same cost a forward)."""
    cache = Path(demo_out, "cache")
    steps = sorted(cache.glob("flare-*/step-*"), key=lambda p: p.stat().st_mtime)
    if steps and (steps[-1] / "config.json").exists():
        return str(steps[-1])
    converted = sorted(cache.glob("converted-*/model.safetensors"), key=lambda p: p.stat().st_mtime)
    if converted:
        return str(converted[-1].parent)
    from flare.demo import Budget, train_models

    return str(train_models(Path(demo_out) / "cache", Budget())[1])


def start_server(model_dir: str, max_num_seqs: int, mode: str, profile: str | None, threads: int
                 ) -> tuple[subprocess.Popen, int]:
    launcher = [sys.executable, "-c", PROFILE_SERVER, profile] if profile else None
    proc, url = bench_serve.start_server(model_dir, max_num_seqs, threads, ("--mode", mode), launcher)
    return proc, int(url.rsplit(":", 1)[1].split("/")[0])


class Client:
    """One keep-alive connection per client thread; chat completions, streamed or not."""

    def __init__(self, port: int, model: str, max_tokens: int) -> None:
        self.port, self.model, self.max_tokens = port, model, max_tokens
        self.local = threading.local()

    def conn(self) -> http.client.HTTPConnection:
        if getattr(self.local, "conn", None) is None:
            self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        return self.local.conn

    def send(self, method: str, path: str, body: str | None = None) -> http.client.HTTPResponse:
        """The response to one request; a connection the server closed while idle is opened again."""
        for attempt in (0, 1):
            conn = self.conn()
            try:
                conn.request(method, path, body, {"Content-Type": "application/json"})
                return conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                self.local.conn = None
                if attempt:
                    raise

    def chat(self, question: str, stream: bool) -> int:
        """Completion tokens of one request."""
        body = {"model": self.model, "messages": [{"role": "user", "content": question}], "stream": stream,
                "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True}
        resp = self.send("POST", "/v1/chat/completions", json.dumps(body))
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        if not stream:
            return len(json.loads(resp.read())["choices"][0]["token_ids"])
        n = 0
        for line in resp:
            if line.startswith(b"data: {"):
                n += len(json.loads(line[6:])["choices"][0]["token_ids"]) if b'"choices": [{' in line else 0
            elif line.startswith(b"data: [DONE]"):
                resp.read()
                break
        return n

    def metrics(self) -> tuple[float, float]:
        """(sum of engine step seconds, steps) from the server's /metrics."""
        text = self.send("GET", "/metrics").read().decode()
        total = float(re.search(r"^flare_step_seconds_sum (\S+)", text, re.M).group(1))
        count = float(re.search(r"^flare_step_seconds_count (\S+)", text, re.M).group(1))
        return total, count


def timed_engine(llm, prompts, params, mode) -> tuple[float, int, float, int]:
    """(wall seconds, tokens, seconds inside Engine.step, steps) of one in-process wave."""
    engine, spent = llm.engine, [0.0, 0]
    step = engine.step

    def counting_step():
        out = step()
        spent[0] += engine.stats.step_seconds
        spent[1] += 1
        return out

    engine.step = counting_step
    t0 = time.perf_counter()
    out = llm.generate(prompts, params, mode)
    wall = time.perf_counter() - t0
    del engine.step
    return wall, sum(len(c.token_ids) for c in out), spent[0], spent[1]


def timed_http(client: Client, pool: ThreadPoolExecutor, questions, stream: bool) -> tuple[float, int, float, int]:
    s0, n0 = client.metrics()
    t0 = time.perf_counter()
    tokens = sum(pool.map(lambda q: client.chat(q, stream), questions))
    wall = time.perf_counter() - t0
    s1, n1 = client.metrics()
    return wall, tokens, s1 - s0, int(n1 - n0)


def per_call(fn, n: int) -> float:
    """Microseconds per call of fn (best of 3 batches of n)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def pieces(llm, port: int, params) -> list[tuple[str, float, str]]:
    """Costs of each piece of the server's path, measured here with the server's code."""
    from flare.serve.app import _data, _Reply
    from flare.serve.protocol import ChatRequest

    out = []
    ids = llm.generate(["12+34="], params)[0].token_ids

    def detok():
        ts = llm.stream(None)
        for t in ids:
            ts.push([t], False)
        ts.push([], True)

    out.append(("TextStream.push (detokenise)", per_call(detok, 20) / len(ids), "per token"))
    body = {"model": llm.name, "messages": [{"role": "user", "content": "12+34="}], "max_tokens": len(ids),
            "temperature": 0, "ignore_eos": True, "stream": True}
    raw = json.dumps(body).encode()
    out.append(("request body: json + pydantic", per_call(lambda: ChatRequest.model_validate(json.loads(raw)), 500),
                "per request"))
    req = ChatRequest.model_validate(body)
    reply = _Reply(llm, req, "chat", "x", 10)

    def chunk():
        c = reply.chunk("7", [7], None)
        return c if isinstance(c, bytes) else _data(c)

    out.append(("SSE chunk: dict + json.dumps", per_call(chunk, 2000), "per chunk"))

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    got = threading.Event()
    out.append(("thread -> event loop hand-off", per_call(lambda: (got.clear(), loop.call_soon_threadsafe(got.set),
                                                                   got.wait()), 500), "per hand-off (round trip)"))
    loop.call_soon_threadsafe(loop.stop)
    keep = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def health(conn: http.client.HTTPConnection) -> None:
        conn.request("GET", "/health")
        conn.getresponse().read()

    out.append(("HTTP GET /health, keep-alive", per_call(lambda: health(keep), 200), "per request"))
    out.append(("HTTP GET /health, new connection",
                per_call(lambda: health(http.client.HTTPConnection("127.0.0.1", port, timeout=30)), 200),
                "per request"))
    keep.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", help="FLARE checkpoint directory (default: the demo's, trained if absent)")
    ap.add_argument("--demo-out", default="demo-out")
    ap.add_argument("--mode", default="causal")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=64, help="exact completion length per request")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    ap.add_argument("--waves", type=int, default=2, help="waves of C requests per measurement")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads here and OMP_NUM_THREADS of the server (0: their defaults)")
    ap.add_argument("--paths", default="decode,engine,http,http stream",
                    help="what to measure: decode (flare.engine.decode, C=1 only), engine (LLM.generate), http, "
                         "http stream")
    ap.add_argument("--profile", help="run the server under yappi and write its busiest functions here")
    args = ap.parse_args()

    import torch

    from flare.decoding import SamplingParams, parse_mode
    from flare.engine import EngineConfig, decode
    from flare.engine.llm import LLM
    from flare.eval import load_task

    if args.threads:
        torch.set_num_threads(args.threads)
    concurrency = sorted(int(c) for c in args.concurrency.split(","))
    model_dir = args.model or find_model(args.demo_out)
    mode = parse_mode(args.mode)
    llm = LLM.from_dir(model_dir, config=EngineConfig(max_num_seqs=max(concurrency)))
    params = SamplingParams(temperature=0, max_new_tokens=args.max_tokens, ignore_eos=True)
    questions = [item.question for item in load_task("arithmetic:2", limit=64).items]
    print(f"model {model_dir}; {args.mode}, {args.max_tokens} tokens, torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    proc, port = start_server(model_dir, max(concurrency), args.mode, args.profile, args.threads)
    client = Client(port, llm.name, args.max_tokens)
    kinds = [k.strip() for k in args.paths.split(",")]
    results: dict[tuple[str, int], list[tuple[float, int, float, int]]] = {}
    try:
        with ThreadPoolExecutor(max(concurrency)) as pool:
            def measure(kind: str, c: int, qs: list[str]):
                prompts = [llm.chat_ids([{"role": "user", "content": q}]) for q in qs]
                if kind == "decode":
                    if c != 1:
                        return None
                    t0 = time.perf_counter()
                    out = decode(llm.model, prompts, params, mode)
                    return time.perf_counter() - t0, len(out.token_ids[0]), 0.0, 0
                if kind == "engine":
                    return timed_engine(llm, prompts, params, mode)
                return timed_http(client, pool, qs, kind == "http stream")

            parts = pieces(llm, port, params)
            if args.profile:
                proc.send_signal(signal.SIGUSR1)
                time.sleep(0.5)
            # One concurrency at a time, lowest first: a lone request after a wave of 8 may get the highest
            # slot back from the scheduler, and a forward then covers every slot up to it (in both engines).
            for c in concurrency:
                for kind in kinds:  # warm-up
                    measure(kind, c, questions[:c])
                for r in range(args.rounds):
                    for kind in kinds:
                        acc = [0.0, 0, 0.0, 0]
                        for w in range(args.waves):
                            qs = [questions[(r * args.waves + w + i) % len(questions)] for i in range(c)]
                            m = measure(kind, c, qs)
                            if m is None:
                                break
                            acc = [a + b for a, b in zip(acc, m)]
                        if acc[1]:
                            results.setdefault((kind, c), []).append(tuple(acc))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    load = os.getloadavg()

    print(f"\nmedian of {args.rounds} interleaved rounds x {args.waves} waves; load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}")
    print(f"{'path':12s} {'C':>2s} {'tok/s':>8s} {'/engine':>8s} {'/decode':>8s} {'ms/step':>8s} {'step ms':>8s} "
          f"{'other ms':>8s}   (per engine step: wall, inside Engine.step, outside it)")
    tps = {key: statistics.median(n / w for w, n, _, _ in runs) for key, runs in results.items()}
    for c in concurrency:
        for kind in kinds:
            if (kind, c) not in results:
                continue
            engine, dec = tps.get(("engine", c), float("nan")), tps.get(("decode", 1), float("nan"))
            vs_decode = f"{tps[kind, c] / dec:7.2f}x" if c == 1 else " " * 8  # decode runs at batch 1 only
            line = f"{kind:12s} {c:2d} {tps[kind, c]:8.1f} {tps[kind, c] / engine:7.2f}x {vs_decode}"
            if kind != "decode":
                wall = statistics.median(1e3 * w / k for w, _, _, k in results[kind, c])
                inside = statistics.median(1e3 * s / k for _, _, s, k in results[kind, c])
                line += f" {wall:8.3f} {inside:8.3f} {wall - inside:8.3f}"
            print(line)
    print("\npieces of the server's path (this process, the server's code):")
    for name, us, unit in parts:
        print(f"  {name:36s} {us:9.1f} us {unit}")
    if args.profile:
        print(f"\nserver profile (yappi, CPU clock): {args.profile}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
