"""Building the training layouts' flex-attention BlockMask: flare.block_mask (tile by tile) vs torch's
``create_block_mask`` (the rule evaluated densely, [B, 1, T, T], then reduced to tiles).

Each build runs in a fresh subprocess, so that its peak memory is its own: on the CPU the growth of the
process's peak RSS (``ru_maxrss``) over the build, on CUDA ``max_memory_allocated`` over it. Time is the best of
``--repeats`` builds (the builder's cache cleared before each). Both builders run at the ``--compare`` lengths,
where the dense one is still feasible, and the results are checked equal (same tiles, field for field); at
``--length`` the tiled builder runs alone unless ``--length`` is also listed in ``--compare``. Ratios are old /
new, measured in this run.

The layout: ``--batch`` rows of ``[x0 ; xt_1 ; ... ; xt_V]`` (T = (1 + views) L; ``--layout packed``: T = L) with
seeded random documents, block-aligned, of mean length ``--doc-length``.

Run:  python benchmarks/bench_block_mask.py [--length 12288] [--views 2] [--block-size 4] [--tile 128]
             [--compare 3072,6144] [--batch 1] [--layout two_stream] [--repeats 3] [--json PATH] [--device cuda]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

BUILDERS = ("create_block_mask", "flare.block_mask")
FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


def doc_ids(batch: int, L: int, align: int, mean: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        row, doc = [], 0
        while len(row) < L:
            n = int(torch.randint(1, max(2, 2 * mean // align), (1,), generator=gen)) * align
            row += [doc] * n
            doc += 1
        rows.append(row[:L])
    return torch.tensor(rows)


def child(a: argparse.Namespace) -> dict:
    """One builder at one length, in this (fresh) process."""
    from torch.nn.attention.flex_attention import create_block_mask

    from flare import block_mask, masks

    device = torch.device(a.device)
    views = a.views if a.layout == "two_stream" else 0
    L = a.T // (1 + views)
    ids = doc_ids(a.batch, L, a.block_size if views else 1, a.doc_length, a.seed).to(device)
    if views:
        rule = masks.two_stream(ids, a.block_size)

        def tiled():
            return block_mask.two_stream(ids, a.block_size, views, tile=a.tile)
    else:
        rule = masks.packed_causal(ids)

        def tiled():
            return block_mask.packed(ids, tile=a.tile)

    def dense():
        return create_block_mask(rule, a.batch, None, a.T, a.T, device=device, BLOCK_SIZE=a.tile)

    build = dense if a.child == BUILDERS[0] else tiled
    small = doc_ids(1, 8, 1, 4, 0).to(device)  # warm up every lazy import and kernel off the clock
    create_block_mask(masks.packed_causal(small), 1, None, 8, 8, device=device, BLOCK_SIZE=4)
    block_mask.packed(small, tile=4)
    block_mask.clear_cache()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.max_memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(a.repeats):
        block_mask.clear_cache()
        start = time.perf_counter()
        bm = build()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        del bm
    peak = (torch.cuda.max_memory_allocated(device) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    bm = build()
    digest = hashlib.sha256()
    for name in FIELDS:
        digest.update(getattr(bm, name).cpu().numpy().tobytes())
    return {"builder": a.child, "T": a.T, "ms": 1e3 * min(times), "peak_MiB": peak / 2**20,
            "partial": int(bm.kv_num_blocks.sum()), "full": int(bm.full_kv_num_blocks.sum()),
            "tiles": a.batch * bm.kv_indices.shape[-2] * bm.kv_indices.shape[-1], "digest": digest.hexdigest()}


def run_child(a: argparse.Namespace, builder: str, T: int, device: torch.device) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", builder, "--T", str(T), "--device", str(device)]
    for name in ("views", "block_size", "tile", "batch", "layout", "repeats", "doc_length", "seed"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(a, name))]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{builder} at T={T} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=12288, help="T of the tiled-only run (default 3 x 4,096)")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--tile", type=int, default=128, help="flex attention's tile (its default: 128)")
    ap.add_argument("--compare", default="3072,6144", help="lengths at which both builders run ('' for none)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layout", choices=("two_stream", "packed"), default="two_stream")
    ap.add_argument("--doc-length", type=int, default=1024, help="mean document length in tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--device", default=None, help="where to build (cpu, cuda); default: CUDA when present, "
                    "else the CPU (flare.device.pick_device)")
    ap.add_argument("--child", choices=BUILDERS, help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return

    from flare.device import describe, pick_device

    device = pick_device(a.device)
    streams = 1 + a.views if a.layout == "two_stream" else 1
    compare = [int(x) for x in a.compare.split(",") if x.strip()]
    for T in compare + [a.length]:
        if T % streams:
            raise SystemExit(f"T={T} is not (1 + views) * L for views={a.views}")
    print(describe(device, torch.float32))
    print(f"layout {a.layout}: batch {a.batch}, views {a.views if streams > 1 else 0}, block {a.block_size}, "
          f"tile {a.tile}, documents of mean length {a.doc_length}; best of {a.repeats} builds, each builder "
          f"in its own process")
    print(f"{'T':>6}  {'builder':<18} {'build ms':>10} {'peak MiB':>9} {'listed tiles (partial/full)':>30}")
    rows, ratios = [], []

    def show(r: dict) -> None:
        listed = f"{r['partial']}/{r['full']} of {r['tiles']}"
        print(f"{r['T']:>6}  {r['builder']:<18} {r['ms']:>10.1f} {r['peak_MiB']:>9.1f} {listed:>30}")

    for T in compare:
        old, new = (run_child(a, b, T, device) for b in BUILDERS)
        show(old)
        show(new)
        same = old["digest"] == new["digest"]
        # Peak growth below 1 MiB is below what ru_maxrss resolves against the process's own noise: floor it.
        mem = old["peak_MiB"] / max(new["peak_MiB"], 1.0)
        ratio = {"T": T, "time_x": old["ms"] / new["ms"], "memory_x": mem, "same_tiles": same}
        memory = ("peak memory below resolution" if old["peak_MiB"] < 1 else
                  f"{'>=' if new['peak_MiB'] < 1 else ''}{mem:.0f}x peak memory")
        print(f"{'':>6}  old / new: {ratio['time_x']:.0f}x build time, {memory}; same tiles: {'yes' if same else 'NO'}")
        rows += [old, new]
        ratios.append(ratio)
    if a.length not in compare:
        r = run_child(a, BUILDERS[1], a.length, device)
        show(r)
        rows.append(r)
        entries = a.batch * a.length ** 2
        line = f"a dense [B, 1, T, T] bool mask alone would hold {entries / 2**20:.0f} MiB"
        olds = [r for r in rows if r["builder"] == BUILDERS[0] and r["peak_MiB"] >= 1]
        if olds:  # create_block_mask's own peak per mask entry, at the largest length it ran
            per = olds[-1]["peak_MiB"] * 2**20 / (a.batch * olds[-1]["T"] ** 2)
            line += (f"; create_block_mask peaked at {per:.1f} bytes per entry at T={olds[-1]['T']}: about "
                     f"{per * entries / 2**30:.1f} GiB here")
        print(f"{'':>6}  {line}")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": str(device), "args": vars(a), "runs": rows,
                                            "ratios": ratios}, indent=1))
    if not all(r["same_tiles"] for r in ratios):
        raise SystemExit("the two builders disagree")


if __name__ == "__main__":
    main()
