"""Serving throughput through the HTTP API: the paper's fixed-output wave protocol, every mode, with accuracy.

For each decoding mode of one converted toy model (or any OpenAI-compatible server with ``--base-url``), and
each concurrency C: a warm-up wave of C requests, then measured waves, each request asking for exactly
``--max-tokens`` tokens with ``ignore_eos`` (a run whose completions are not all exactly that long is marked
invalid). Printed: aggregate tokens/s, the ratio to causal mode and to the ``low_confidence`` peer decoder at
the same C (all measured in this run), tokens per forward, and each mode's greedy accuracy on held-out
problems beside its speed, so that no speed is read without its quality.

Goals printed at the end: aggregate tokens/s at C=8 >= 3x C=1 for every mode (batching works), and AR-Trust at
C=8 >= 2x causal at C=8.

    python benchmarks/bench_serve.py                       # the demo's trained toy model (trained if absent)
    python benchmarks/bench_serve.py --model DIR           # a FLARE checkpoint, served by `flare serve`
    python benchmarks/bench_serve.py --base-url http://host:8000/v1 --modes server   # another server (vLLM...)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flare.decoding import ModeOptions
from flare.eval import HttpTarget, load_task, parse_targets, run_waves
from flare.eval.report import throughput_table


def start_server(model_dir: str, max_num_seqs: int, threads: int, extra: tuple[str, ...] = (),
                 launcher: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """``flare serve`` in a subprocess on a free port (``launcher``: the command before ``serve ...``, ``python
    -m flare`` by default; ``extra``: more serve flags); returns it and its base URL once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["serve", model_dir, "--port", str(port), "--max-num-seqs", str(max_num_seqs), *extra]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen([*(launcher or [sys.executable, "-m", "flare"]), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flare serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("flare serve did not start in 180 s")


def accuracy(http: HttpTarget, mode: ModeOptions | None, task, max_tokens: int) -> float:
    """Greedy accuracy through the same server, end-of-sequence on."""
    def one(item) -> float:
        reply = http.chat(item.question, mode, max_tokens, ignore_eos=False)
        return item.scorer(reply["choices"][0]["message"]["content"])

    with cf.ThreadPoolExecutor(8) as pool:
        scores = list(pool.map(one, task.items))
    return sum(scores) / len(scores)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    target = ap.add_mutually_exclusive_group()
    target.add_argument("--model", help="FLARE checkpoint directory to serve in-process")
    target.add_argument("--base-url", help="an OpenAI-compatible server to measure instead")
    ap.add_argument("--demo-out", default="demo-out", help="where the demo's trained toy model is cached")
    ap.add_argument("--modes", default="causal,ar_trust,diffusion_trust,low_confidence",
                    help="comma-separated, each with optional :key=value options (unset ones come from the "
                         "checkpoint's training block); 'server' sends no mode field")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--max-tokens", type=int, default=64, help="exact completion length per request")
    ap.add_argument("--waves", type=int, default=3, help="measured waves after one warm-up wave")
    ap.add_argument("--task", default="arithmetic:2", help="prompts and the accuracy task")
    ap.add_argument("--accuracy-limit", type=int, default=40, help="questions for the accuracy column (0: skip)")
    ap.add_argument("--threads", type=int, default=0, help="OMP threads of the server process (0: default)")
    ap.add_argument("--engine", default="process", choices=("process", "thread"),
                    help="flare serve --engine: the engine in a process of its own or in the server's thread")
    ap.add_argument("--temperature", type=float, default=0.0, help="of the waves' requests (0: greedy; else unseeded "
                    "sampling, as a client's default request); accuracy stays greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="of the waves' sampled requests")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    concurrency = [int(c) for c in args.concurrency.split(",")]
    modes = parse_targets(args.modes)
    server = None
    if args.base_url is None:
        model_dir = args.model
        if model_dir is None:
            from flare.demo import Budget, train_models

            model_dir = train_models(Path(args.demo_out) / "cache", Budget())[1]
        # The server runs in its own process, as it would in production: the client's threads never share its
        # interpreter lock.
        server, base_url = start_server(str(model_dir), max(concurrency), args.threads, ("--engine", args.engine))
        print(f"serving {model_dir} at {base_url} (pid {server.pid})")
    else:
        base_url = args.base_url.rstrip("/")
    try:
        http = HttpTarget(base_url)  # greedy: the accuracy column
        waves = HttpTarget(base_url, temperature=args.temperature, top_p=args.top_p)
        task = load_task(args.task, limit=max(args.accuracy_limit, max(concurrency) * 4))
        questions = [item.question for item in task.items]
        runs, acc = [], {}
        for mode in modes:
            for c in concurrency:
                t0 = time.perf_counter()
                runs.append(run_waves(waves, questions, mode, c, args.max_tokens, args.waves))
                print(f"  {runs[-1].mode} C={c}: {runs[-1].tokens_per_s:.1f} tok/s "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
            if args.accuracy_limit:
                task.items = task.items[: args.accuracy_limit]
                acc[runs[-1].mode] = accuracy(http, mode, task, 64)
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)

    print()
    print(throughput_table(runs))
    print()
    if acc:
        print("greedy accuracy (same server, eos on): " + ", ".join(f"{m} {100 * a:.1f}%" for m, a in acc.items()))
    speed = {(r.mode, r.concurrency): r.tokens_per_s for r in runs}
    lo, hi = min(concurrency), max(concurrency)
    print(f"\ngoal: aggregate tokens/s at C={hi} >= 3x C={lo} for every mode")
    for mode in dict.fromkeys(r.mode for r in runs):
        ratio = speed[(mode, hi)] / speed[(mode, lo)] if speed.get((mode, lo)) else 0.0
        print(f"  {mode:16s} {ratio:5.2f}x  {'MET' if ratio >= 3 else 'NOT MET'}")
    if ("ar_trust", hi) in speed and ("causal", hi) in speed:
        ratio = speed[("ar_trust", hi)] / speed[("causal", hi)]
        print(f"goal: AR-Trust >= 2x causal at C={hi}: {ratio:.2f}x  {'MET' if ratio >= 2 else 'NOT MET'}")
    if not all(r.valid for r in runs):
        print("INVALID: some completions did not have the target length; see the table")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": [r.to_dict() for r in runs], "accuracy": acc}, indent=2))
    return 0 if all(r.valid for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
