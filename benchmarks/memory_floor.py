"""Causal decode step time against the memory floor: the bytes a cached decode step must move, over the
device's copy bandwidth (CPU or ``--device cuda``).

What it measures, in one run on one model (``--model DIR``, else the seeded random qwen3_5 of ``--size``; ``real``
is Qwen3.5-0.8B-shaped):

* bandwidth: ``dst.copy_(src)`` of a ``--copy-mib`` MiB tensor on the device (median of ``--repeats`` after a
  warm-up), counted as read + write: 2 x its bytes per copy.
* bytes per decode step at batch B, the least any implementation moves: every weight read once (the embedding
  only for its B looked-up rows unless it is tied to the LM head, which reads it whole); each Gated DeltaNet
  layer's recurrent state (fp32 [B, H, Dk, Dv]) and conv window read and written; each attention layer's
  keys/values of the committed tokens read (their mean count over the timed steps) and one new row written.
  floor ms = bytes / bandwidth.
* measured: ms per cached greedy decode step (bench_decode.py's loop: one forward + LM head + argmax per step,
  under ``frozen_weights``, prefill excluded), median of ``--repeats`` runs of ``--steps`` steps.
* measured / floor: 1.0 is the memory roofline; above it, time goes to compute, kernel launches or Python.

Run:  .venv/bin/python benchmarks/memory_floor.py [--model DIR | --size tiny|small|real] [--batch 1,8]
          [--steps 16] [--device cuda] [--dtype auto|float32|bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import ExitStack

import torch
from _models import SIZE_HELP, SIZES, add_device_args, random_checkpoint, resolve_checkpoint, sync
from bench_decode import flare_prefill, flare_steps

import flare
from flare.device import describe
from flare.model.cache import AttentionState, RecurrentState


def copy_bandwidth(device: torch.device, mib: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), median of ``repeats``."""
    n = mib * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first touch of every page
    times = []
    for _ in range(max(repeats, 1)):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def weight_bytes(model, batch: int) -> int:
    """Bytes of weights one decode step reads: every parameter once (shared ones once); an untied embedding only
    for the ``batch`` rows it looks up."""
    seen, total = set(), 0
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if p is embed and not tied:
            total += batch * p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def state_bytes(cache, mean_len: float) -> tuple[int, int]:
    """(recurrent bytes, KV bytes) one decode step moves: GDN states and conv windows read and written; keys and
    values of ``mean_len`` committed tokens read and one new row written, per attention layer."""
    recurrent = kv = 0
    for layer in cache.layers:
        if isinstance(layer, RecurrentState):
            recurrent += 2 * sum(t.numel() * t.element_size() for t in (layer.ssm, layer.conv))
        elif isinstance(layer, AttentionState):
            B, H, _, D = layer.k.shape  # head-major [B, Hkv, capacity, D]
            kv += 2 * B * (mean_len + 1) * H * D * layer.k.element_size()
    return recurrent, int(kv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: the seeded random model of --size)")
    ap.add_argument("--size", choices=list(SIZES), default="small", help=SIZE_HELP)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens before the timed steps")
    ap.add_argument("--steps", type=int, default=16, help="new tokens per timed run (steps - 1 timed forwards)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (median), after one warm-up run")
    ap.add_argument("--copy-mib", type=int, default=None, help="size of the bandwidth copy (default: 2048 MiB on "
                    "CUDA, 512 MiB on the CPU: well past every cache)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the copy uses them too)")
    add_device_args(ap)
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args()
    if a.steps < 2:
        ap.error("--steps must be >= 2")
    batches = sorted({int(b) for b in a.batch.split(",")})
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()

    with ExitStack() as stack:
        ckpt = a.model or str(random_checkpoint(stack.enter_context(tempfile.TemporaryDirectory()), a.size, a.seed))
        device, dtype = resolve_checkpoint(a, ckpt)
        model = flare.load_model(ckpt, device=device, dtype=dtype).eval()
    cfg = model.config
    mib = a.copy_mib or (2048 if device.type == "cuda" else 512)
    bandwidth = copy_bandwidth(device, mib, max(a.repeats, 5))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"causal decode step vs memory floor | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"{describe(device, dtype)}")
    print(f"model: {a.model or 'RANDOM seeded qwen3_5 (' + a.size + ')'}, {n_params / 1e6:.2f}M params, hidden "
          f"{cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}")
    print(f"bandwidth: {bandwidth / 1e9:.1f} GB/s ({mib} MiB device-to-device copy, read + write counted)")
    print(f"decode: {a.steps - 1} cached greedy steps after a {a.prompt_len}-token prompt, median of {a.repeats}\n")

    gen = torch.Generator().manual_seed(a.seed)
    rows = []
    with torch.no_grad():
        for B in batches:
            ids = torch.randint(4, cfg.vocab_size - 1, (B, a.prompt_len), generator=gen).to(device)
            run = lambda: flare_steps(model, *flare_prefill(model, ids, a.steps), a.steps)  # noqa: E731
            run()
            ms = 1e3 * statistics.median(run()[0] for _ in range(max(a.repeats, 1))) / (a.steps - 1)
            _, cache = flare_prefill(model, ids, a.steps)
            weights = weight_bytes(model, B)
            recurrent, kv = state_bytes(cache, a.prompt_len + (a.steps - 2) / 2)
            total = weights + recurrent + kv
            floor = 1e3 * total / bandwidth
            rows.append(dict(batch=B, measured_ms=ms, floor_ms=floor, ratio=ms / floor, weight_bytes=weights,
                             recurrent_bytes=recurrent, kv_bytes=kv, achieved_GBps=total / ms / 1e6))
    hdr = (f"{'batch':>5}{'weights MB':>12}{'GDN state MB':>14}{'KV MB':>8}{'floor ms':>10}{'measured ms':>13}"
           f"{'x floor':>9}{'achieved GB/s':>15}")
    print(hdr)
    for r in rows:
        print(f"{r['batch']:>5}{r['weight_bytes'] / 1e6:>12.1f}{r['recurrent_bytes'] / 1e6:>14.2f}"
              f"{r['kv_bytes'] / 1e6:>8.2f}{r['floor_ms']:>10.3f}{r['measured_ms']:>13.2f}{r['ratio']:>8.1f}x"
              f"{r['achieved_GBps']:>15.1f}")
    elapsed = time.perf_counter() - t_start
    print("\nSUMMARY: causal decode at " + ", ".join(f"batch {r['batch']} {r['ratio']:.1f}x" for r in rows)
          + f" the memory floor ({bandwidth / 1e9:.1f} GB/s copy bandwidth) [{elapsed:.0f} s]")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(benchmark="memory_floor", describe=describe(device, dtype), device=str(device),
                           dtype=str(dtype).removeprefix("torch."), torch=torch.__version__,
                           threads=torch.get_num_threads(), model=a.model or f"random {a.size}", params=n_params,
                           bandwidth_GBps=bandwidth / 1e9, copy_mib=mib, steps=a.steps, prompt_len=a.prompt_len,
                           batches=rows, elapsed_s=elapsed), f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
