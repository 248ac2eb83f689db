"""What compiling a decoding forward buys on this machine: a causal step (one row a sequence) and an AR-Trust verify
forward (N clean rows and N-1 MASK rows a sequence, one group after all drafts) of one checkpoint, each run eagerly
and under ``torch.compile`` with static shapes, as ratios measured in one run.

A compiled graph wants static shapes, and decoding's cache does not have them: attention reads the keys up to the
longest sequence, one more every step. Both forwards here read a cache of fixed capacity whole, under a length
mask, and write it at tensor positions (``StaticCache``, built here from flare's ``ModelCache``); the eager arm runs
the same static forwards, so the two arms differ only in compilation. Timed: the decoder stack, the final norm, the
LM head and the greedy picks (``flare.model`` as decoding calls it, under ``frozen_weights`` with the linears
prepacked where decoding packs them, the context built outside the graph); not the commit, acceptance or
scheduling around them. The causal step rewrites one slot (lengths stay put), so every timed call has the same
shapes and work. ``--backend eager`` traces with dynamo alone (no code generated): the smoke test's check that
each forward compiles as one graph.

    python benchmarks/bench_static_step.py [--model DIR | --size tiny|small|real] [--batch 1,8] [--clean N]
        [--noisy M] [--threads 1] [--dtype auto|float32|bfloat16] [--backend inductor|eager] [--no-freeze]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from _models import SIZE_HELP, SIZES, add_device_args, random_checkpoint, resolve_checkpoint, sync

import flare
from flare import masks
from flare.device import describe, pack_linears, prepare_process
from flare.model.cache import CommitRecord, ModelCache
from flare.model.context import ForwardContext, RowMeta, Rows
from flare.model.layers import frozen_weights, rotary
from flare.model.packed_linear import prepack
from flare.ops.sampling import argmax


class StaticCache(ModelCache):
    """A cache whose attention reads every slot of its capacity (the mask hides the empty ones) and whose lengths
    the benchmark holds still: what a static-shape graph reads and writes."""

    def write_kv(self, layer_idx, k_BTHD, v_BTHD, write_pos):
        super().write_kv(layer_idx, k_BTHD, v_BTHD, write_pos)  # written at the tensor positions
        layer = self.layers[layer_idx]
        return layer.k, layer.v  # read whole

    def advance(self, n_new_B, max_new, uniform=False) -> None:
        pass  # the benchmark's steps rewrite the same slot


class Forwards:
    """The two static forwards of one batch over one cache, and their contexts (built outside any graph)."""

    def __init__(self, model, batch: int, capacity: int, clean: int, noisy: int) -> None:
        self.model, self.B, self.capacity, self.N, self.M = model, batch, capacity, clean, noisy
        cache = model.new_cache(batch, capacity=capacity)
        cache.__class__ = StaticCache
        self.cache = cache
        self.clean = torch.full((batch,), clean, device=model.device)
        self.noisy = torch.full((batch,), noisy, device=model.device)

    def _rope(self, positions):
        c = self.model.config
        return rotary(positions, c.rotary_dim, c.head_dim, c.rope_theta, self.model.dtype, self.model.device,
                      self.capacity)

    def step_context(self) -> ForwardContext:
        cache = self.cache
        pos = cache.lengths[:, None]
        mask = masks.materialize(masks.causal_from(cache.lengths), self.B, 1, self.capacity, self.model.device)
        return ForwardContext("causal", self._rope(pos), mask, cache, pos)

    def rows_context(self) -> ForwardContext:
        cache, T = self.cache, self.N + self.M
        pos = cache.lengths[:, None] + torch.arange(T, device=self.model.device)
        rule = masks.inference_rows(cache.lengths, self.clean, self.clean + self.noisy)
        mask = masks.materialize(rule, self.B, T, self.capacity, self.model.device)
        return ForwardContext("rows", self._rope(pos), mask, cache=cache, write_pos=pos, layout=Rows(self.N, self.M),
                              record=CommitRecord(T, {}), row_meta=RowMeta.of(self.clean, self.noisy, T))


def picks(model, ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """Greedy picks of every row, by decoding's own argmax (``torch.argmax`` over bf16 rows is single-threaded on
    the CPU: 25 ms of a 0.75B verify forward at 8 sequences): the part of a forward a graph holds."""
    return argmax(model.logits(model.hidden_states(ids, cache=ctx.cache, context=ctx)))


def timed(fn, iters: int, device) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t) / iters * 1e3


def run_batch(model, args, batch: int) -> list[dict]:
    fw = Forwards(model, batch, args.capacity, args.clean, args.noisy)
    gen = torch.Generator().manual_seed(args.seed + batch)
    vocab = model.config.vocab_size - 1  # never the [MASK] id
    ids = torch.randint(0, vocab, (batch, 1), generator=gen).to(model.device)
    for _ in range(args.prompt):  # fill the cache through the static step, one position at a time
        ids = picks(model, ids, fw.step_context())[:, :1]
        fw.cache.lengths += 1
    rows_ids = torch.randint(0, vocab, (batch, args.clean + args.noisy), generator=gen).to(model.device)
    rows_ids[:, args.clean:] = model.config.mask_token_id
    kinds = [("causal step", ids, fw.step_context), ("verify N+M", rows_ids, fw.rows_context)]
    out = []
    for name, x, context in kinds:
        graph = torch.compile(picks, backend=args.backend, dynamic=False, fullgraph=True)
        saved = fw.cache.clone()
        t0 = time.perf_counter()
        try:
            got = graph(model, x, context())
        except Exception as e:  # a benchmark reports it; decoding would fall back to eager
            sys.exit(f"{name}, batch {batch}: torch.compile ({args.backend}) failed: {type(e).__name__}: {e}")
        compile_s = time.perf_counter() - t0
        _restore(fw.cache, saved)
        want = picks(model, x, context())
        _restore(fw.cache, saved)
        eager, compiled = [], []
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both arms alike
            eager.append(timed(lambda: picks(model, x, context()), args.iters, model.device))
            compiled.append(timed(lambda: graph(model, x, context()), args.iters, model.device))
        out.append(dict(batch=batch, forward=name, rows=x.shape[1], eager_ms=min(eager), compiled_ms=min(compiled),
                        compile_s=compile_s, same=int((got == want).sum()), picks=got.numel()))
    return out


def _restore(cache: ModelCache, saved: ModelCache) -> None:
    """Put back the states a causal step wrote in place (the comparison's two arms start from the same cache)."""
    for layer, old in zip(cache.layers, saved.layers):
        for name in ("k", "v", "conv", "ssm"):
            if hasattr(layer, name):
                getattr(layer, name).copy_(getattr(old, name))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="FLARE checkpoint directory (default: the random model of --size)")
    ap.add_argument("--size", choices=list(SIZES), default="tiny", help=SIZE_HELP)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--clean", type=int, default=None, help="clean rows N a sequence (default: the checkpoint's "
                    "training block + 1, AR-Trust's N)")
    ap.add_argument("--noisy", type=int, default=None, help="MASK rows a sequence (default: N - 1)")
    ap.add_argument("--capacity", type=int, default=128, help="KV slots a sequence (read whole by both arms)")
    ap.add_argument("--prompt", type=int, default=40, help="positions filled before timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=50, help="forwards per timing")
    ap.add_argument("--repeats", type=int, default=3, help="timings per arm, interleaved (best kept)")
    ap.add_argument("--backend", choices=("inductor", "eager"), default="inductor",
                    help="inductor generates code; eager only traces (a check that each forward is one graph)")
    ap.add_argument("--no-freeze", action="store_true", help="inductor without freezing (weights as inputs, "
                    "linears not prepacked by inductor)")
    add_device_args(ap)
    args = ap.parse_args(argv)
    prepare_process()  # first, before torch starts its intra-op threads (flare.device)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or random_checkpoint(tmp, args.size, seed=args.seed)
        device, dtype = resolve_checkpoint(args, path)
        model = flare.load_model(path, device=device, dtype=dtype).eval()
    if pack_linears(device, dtype):
        prepack(model)  # as decoding's stepper does; a traced graph runs F.linear instead (packed_linear.py)
    if model.config.mask_token_id is None:  # a random model: its last id stands in for [MASK]
        model.config.mask_token_id = model.config.vocab_size - 1
    args.clean = args.clean or model.config.trained_block + 1
    args.noisy = args.clean - 1 if args.noisy is None else args.noisy
    if args.prompt + args.clean + args.noisy > args.capacity:
        ap.error(f"--prompt + rows ({args.prompt + args.clean + args.noisy}) must fit --capacity {args.capacity}")
    if args.backend == "inductor" and not args.no_freeze:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights become constants: inductor prepacks the linears itself
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    c = model.config
    print(f"static-shape forwards, eager vs torch.compile({args.backend}"
          f"{', freezing' if args.backend == 'inductor' and not args.no_freeze else ''}) | torch {torch.__version__} | "
          f"threads {args.threads} | {describe(device, dtype, model)}")
    print(f"model: {args.model or 'random ' + args.size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"params, hidden {c.hidden_size}, {c.num_hidden_layers} layers; rows a sequence: causal 1, verify "
          f"{args.clean} clean + {args.noisy} MASK; KV read whole at capacity {args.capacity}, {args.prompt} filled")
    results = []
    with torch.inference_mode(), frozen_weights():  # as decoding's runners
        for batch in (int(b) for b in args.batch.split(",")):
            results += run_batch(model, args, batch)
    print(f"\n{'batch':>5}  {'forward':12s} {'rows':>4}  {'eager ms':>9}  {'compiled ms':>11}  {'compiled/eager':>14}  "
          f"{'compile s':>9}  same picks")
    for r in results:
        print(f"{r['batch']:>5}  {r['forward']:12s} {r['rows']:>4}  {r['eager_ms']:>9.3f}  {r['compiled_ms']:>11.3f}  "
              f"{r['compiled_ms'] / r['eager_ms']:>13.2f}x  {r['compile_s']:>9.1f}  {r['same']}/{r['picks']}")
    print()
    for batch in dict.fromkeys(r["batch"] for r in results):
        step, rows = (r for r in results if r["batch"] == batch)
        print(f"batch {batch}: verify forward / causal step: eager {rows['eager_ms'] / step['eager_ms']:.2f}x, "
              f"compiled {rows['compiled_ms'] / step['compiled_ms']:.2f}x")
    print("SUMMARY: compiled / eager: " + ", ".join(
        f"{r['forward']} b{r['batch']} {r['compiled_ms'] / r['eager_ms']:.2f}x" for r in results))
    return results


if __name__ == "__main__":
    main()
