"""What the decoder layers' linears cost per decoding step on this CPU, per GEMM path and rows per sequence.

Every linear of every decoder layer of a checkpoint (the LM head aside), each applied once to M rows, as one
decoding step applies them: so the weights stream from memory as in a real step instead of staying in cache,
as they would in a loop over one weight. M = 1 is a causal step, M = 5 or 9 an AR-Trust round's verify and draft
rows. ``--idle-ms``: the CPU spins that long before each pass, as a decoding step runs a whole forward between two
uses of a weight, so that the weights come as cold as they do there (on a shared CPU they leave the cache within a
few ms). Paths: ``F.linear`` in float32 (on the row-major weight, and on a column-major copy: what decoding runs
for fp32 weights too small to pack, ``flare.model.packed_linear``) and in bfloat16; oneDNN's prepacked bf16 and
fp32 linears
(``torch.ops.mkldnn._reorder_linear_weight`` once, then ``_linear_pointwise``: what decoding runs,
``flare.model.packed_linear``); MKL's prepacked fp32 linear
(``torch.ops.mkl._mkl_reorder_linear_weight`` for each M, then ``_mkl_linear``); a path this torch build lacks is
reported as such. Ratios are to float32 ``F.linear`` at M = 1 and to the same path at M = 1, in one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models  # noqa: E402


def layer_weights(path: str) -> list[torch.Tensor]:
    from flare.checkpoint import load_model

    model = load_model(path).float().eval()
    return [m.weight.detach().contiguous() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"]


def paths(weights: list[torch.Tensor]) -> dict[str, object]:
    """name -> prepare(M), which gives one step's calls (one per weight, inputs made), or why it is unavailable."""
    bf16 = [w.to(torch.bfloat16) for w in weights]

    def rows(M: int, w: torch.Tensor) -> torch.Tensor:
        return torch.randn(M, w.shape[1], dtype=w.dtype)

    columns = [w.t().contiguous().t() for w in weights]
    out: dict[str, object] = {
        "F.linear fp32": lambda M: [partial(F.linear, rows(M, w), w) for w in weights],
        "F.linear fp32 col-major": lambda M: [partial(F.linear, rows(M, w), w) for w in columns],
        "F.linear bf16": lambda M: [partial(F.linear, rows(M, w), w) for w in bf16],
    }
    for name, ws in (("oneDNN packed bf16", bf16), ("oneDNN packed fp32", weights)):
        try:
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]
            out[name] = partial(lambda ws_, packed_, M: [
                partial(torch.ops.mkldnn._linear_pointwise, rows(M, w), p, None, "none", [], "")
                for w, p in zip(ws_, packed_)], ws, packed)
        except (RuntimeError, AttributeError) as e:
            out[name] = f"unavailable ({type(e).__name__}: {str(e)[:60]})"
    try:
        torch.ops.mkl._mkl_reorder_linear_weight(weights[0], 1)
        out["MKL packed fp32"] = lambda M: [
            partial(torch.ops.mkl._mkl_linear, rows(M, w), torch.ops.mkl._mkl_reorder_linear_weight(w, M), w, None, M)
            for w in weights]
    except (RuntimeError, AttributeError) as e:
        out["MKL packed fp32"] = f"unavailable ({type(e).__name__}: {str(e)[:60]})"
    return out


def run_step(calls: list) -> None:
    for call in calls:
        call()


def spin(seconds: float) -> None:
    """Keep the core busy without touching memory (sleeping could move the thread to another core)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def best_ms(calls: list, repeats: int, idle_ms: float = 0.0) -> float:
    run_step(calls)  # warm-up
    times = []
    for _ in range(repeats):
        spin(idle_ms / 1e3)
        start = time.perf_counter()
        run_step(calls)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: the random model of --size)")
    ap.add_argument("--size", default="small", choices=sorted(_models.SIZES), help="random model size")
    ap.add_argument("--rows", default="1,5,9", help="rows per sequence to measure")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--idle-ms", type=float, default=0.0,
                    help="spin this long before each timed pass (cold weights, as between decoding's uses of them)")
    a = ap.parse_args(argv)
    if a.idle_ms < 0:
        ap.error("--idle-ms must be >= 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    from flare.device import cpu_path

    with tempfile.TemporaryDirectory() as tmp:
        model = a.model or str(_models.random_checkpoint(Path(tmp) / a.size, a.size))
        weights = layer_weights(model)
    rows = [int(r) for r in a.rows.split(",")]
    print(f"decoder-layer linears of {model}: {len(weights)} weights, {sum(w.numel() for w in weights) / 1e6:.1f}M "
          f"parameters | cpu path {cpu_path()} | threads {torch.get_num_threads()} | torch {torch.__version__}"
          f" | {a.idle_ms:g} ms idle before each pass")
    results: dict[str, dict[int, float] | str] = {}
    with torch.no_grad():
        for name, prepare in paths(weights).items():
            results[name] = prepare if isinstance(prepare, str) else {M: best_ms(prepare(M), a.repeats, a.idle_ms)
                                                                           for M in rows}
    base = results["F.linear fp32"][rows[0]]
    print(f"{'path':24s}" + "".join(f"{f'M={M} ms':>10s}{'x fp32 M=1':>12s}{'x own M=1':>11s}" for M in rows))
    for name, r in results.items():
        if isinstance(r, str):
            print(f"{name:24s} {r}")
            continue
        print(f"{name:24s}" + "".join(f"{r[M]:10.2f}{r[M] / base:11.2f}x{r[M] / r[rows[0]]:10.2f}x" for M in rows))
    return results


if __name__ == "__main__":
    main()
