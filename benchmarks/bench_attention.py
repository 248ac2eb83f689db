"""Decoding's attention: the SDPA call decoding made before against the one with each key/value head's query heads
folded into its rows (``flare.ops.attention.folded_sdpa``, what the CPU runs), per op and per decode step.

1. Per op, at the attention shapes of the demo model (4 query heads on 2 key/value heads of 32 dims),
   SmolLM2-135M (9 on 3, 64) and Qwen3.5-0.8B (8 on 2, 256): batch 1 and 8, 1 and 7 query rows (a causal step, an
   AR-Trust round of gen block 4), ``--contexts`` keys, a length mask, in bf16 (where the CPU computes it
   natively) and fp32. Prints the median microseconds of each call, their ratio (folded / the other, < 1: the
   fold is faster) and the largest difference between their outputs. The other call: on the CPU grouped SDPA
   (``enable_gqa``); on CUDA the key/value heads expanded to every query head first (``masked_sdpa``, what
   decoding runs there: no fused CUDA kernel takes a mask with grouped heads), so that a GPU run measures what
   the fold would save there. On the CPU ``attention`` folds only where ``fold_groups`` says; the rows it
   leaves to the plain call are marked.
2. Per decode step (``--model DIR`` or ``--size``): ms per cached greedy causal step after a prompt of each of
   ``--decode-contexts`` tokens, batch 1 and ``--batch``, with the fold on and off (``fold_groups`` replaced for
   the off arm), the two interleaved (``bench_decode.paired``), and whether the greedy tokens are equal (CPU
   only: decoding folds only there).

Run:  python benchmarks/bench_attention.py [--threads 2] [--contexts 64,512,2048] [--device cuda] [--json FILE]
          [--size real | --model DIR] [--decode-contexts 64,1024] [--steps 16]
``benchmarks/gpu_check.sh`` runs the per-op table on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from _models import SIZE_HELP, SIZES, add_device_args, random_checkpoint, resolve_checkpoint, sync

import flare.ops.attention as attn
from flare.device import describe, native_bf16, pick_device

# (name, query heads, key/value heads, head dim)
SHAPES = [("demo", 4, 2, 32), ("SmolLM2-135M", 9, 3, 64), ("Qwen3.5-0.8B", 8, 2, 256)]


def median_us(fn, repeats: int, device: torch.device, calls: int = 20) -> float:
    fn()
    sync(device)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        runs.append((time.perf_counter() - t0) / calls)
    return 1e6 * statistics.median(runs)


def op_table(device: torch.device, dtypes: list[torch.dtype], contexts: list[int], repeats: int) -> list[dict]:
    other = "expanded" if device.type == "cuda" else "grouped"
    print(f"{'shape':14s} {'dtype':9s} {'B':>2s} {'T':>2s} {'keys':>5s} {other + ' us':>11s} {'folded us':>10s} "
          f"{'ratio':>6s} {'max diff':>9s}")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, H, G, D in SHAPES:
        for dtype in dtypes:
            for B in (1, 8):
                for T in (1, 7):
                    for S in contexts:
                        q = torch.randn(B, H, T, D, generator=gen).to(device, dtype)
                        k, v = (torch.randn(B, G, S, D, generator=gen).to(device, dtype) for _ in range(2))
                        length = torch.randint(S // 2, S - T + 1, (B,), generator=gen)
                        mask = (torch.arange(S)[None, None, None] <= length[:, None, None, None]
                                + torch.arange(T)[None, None, :, None]).to(device)
                        plain = lambda: attn.masked_sdpa(  # noqa: E731
                            q, k, v, mask, D**-0.5, expand_kv=device.type == "cuda")
                        folded = lambda: attn.folded_sdpa(q, k, v, mask, D**-0.5)  # noqa: E731
                        a, b = median_us(plain, repeats, device), median_us(folded, repeats, device)
                        diff = (plain().float() - folded().float()).abs().max().item()
                        decoding = "folded" if attn.fold_groups(q, k) else other
                        rows.append(dict(shape=name, dtype=str(dtype)[6:], batch=B, rows=T, keys=S, other=other,
                                         other_us=a, folded_us=b, ratio=b / a, max_diff=diff, decoding=decoding))
                        runs = "" if decoding == "folded" else f"  (decoding runs the {other} call)"
                        print(f"{name:14s} {str(dtype)[6:]:9s} {B:2d} {T:2d} {S:5d} {a:11.0f} {b:10.0f} "
                              f"{b / a:5.2f}x {diff:9.1e}{runs}")
    return rows


def decode_table(path, args) -> list[dict]:
    from bench_decode import decode_run, flare_prefill, flare_steps, paired, random_ids

    import flare

    device, dtype = resolve_checkpoint(args, path)
    model = flare.load_model(path, device=device, dtype=dtype)
    print(f"\ncausal decode ms/step, {path}, {describe(device, dtype)}: fold on / off "
          f"({args.steps - 1} timed steps after the prompt, median of {args.repeats}, interleaved)")
    print(f"{'prompt':>6s} {'B':>2s} {'fold ms':>8s} {'plain ms':>9s} {'ratio':>6s}  greedy tokens")
    original = attn.fold_groups
    gen = torch.Generator().manual_seed(0)
    rows = []

    def arm(fold: bool, ids):
        run = decode_run(flare_prefill, flare_steps, model, ids, args.steps)

        def timed():
            attn.fold_groups = original if fold else (lambda q, k: False)
            try:
                return run()
            finally:
                attn.fold_groups = original
        return timed

    with torch.no_grad():
        for n in args.decode_contexts:
            for B in sorted({1, args.batch}):
                ids = random_ids(gen, model.config.vocab_size, B, n, device)
                on_s, off_s, on_tok, off_tok = paired(arm(True, ids), arm(False, ids), args.repeats)
                ms_on, ms_off = 1e3 * on_s / (args.steps - 1), 1e3 * off_s / (args.steps - 1)
                same = "identical" if torch.equal(on_tok, off_tok) else \
                    f"{int((on_tok != off_tok).sum())} of {on_tok.numel()} differ (bf16 near-ties)"
                print(f"{n:6d} {B:2d} {ms_on:8.1f} {ms_off:9.1f} {ms_on / ms_off:5.2f}x  {same}")
                rows.append(dict(prompt=n, batch=B, fold_ms=ms_on, plain_ms=ms_off, ratio=ms_on / ms_off,
                                 same_tokens=bool(torch.equal(on_tok, off_tok))))
    return rows


def main() -> None:
    from flare.device import prepare_process

    prepare_process()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    ap.add_argument("--contexts", type=ints, default=[64, 512, 2048], help="keys per sequence, per-op table")
    ap.add_argument("--dtypes", default="auto", help="auto (bf16 where native, and fp32), or a comma list")
    ap.add_argument("--model", default=None, help="a checkpoint for the per-step table")
    ap.add_argument("--size", choices=list(SIZES), default=None, help=SIZE_HELP + "; for the per-step table")
    ap.add_argument("--decode-contexts", type=ints, default=[64, 1024], help="prompt tokens, per-step table")
    ap.add_argument("--batch", type=int, default=8, help="the larger batch of the per-step table")
    ap.add_argument("--steps", type=int, default=16, help="new tokens per decode run of the per-step table")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="the per-step table's dtype (auto: flare.device.pick_dtype)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_device_args(ap, dtype=False)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    args.device = str(device)
    if args.dtypes == "auto":
        dtypes = ([torch.bfloat16] if native_bf16(device) else []) + [torch.float32]
    else:
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    other = "expanded key/value heads" if device.type == "cuda" else "grouped SDPA"
    header = describe(device, dtypes[0])
    print(f"decoding attention, {other} vs query heads folded into rows | torch {torch.__version__} | "
          f"threads {args.threads} | {header}")
    report = {"describe": header, "torch": torch.__version__, "ops": op_table(device, dtypes, args.contexts,
                                                                              args.repeats)}
    if (args.model or args.size) and device.type != "cpu":
        print("\n(the per-step table is CPU only: decoding folds only there)")
    elif args.model or args.size:
        with tempfile.TemporaryDirectory() as tmp:
            path = args.model or random_checkpoint(f"{tmp}/model", args.size)
            report["steps"] = decode_table(path, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
