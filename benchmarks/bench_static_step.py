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
each forward compiles as one graph; ``--backend none`` leaves compilation out.

On CUDA a third arm captures each eager static forward in a CUDA graph (``torch.cuda.CUDAGraph``, its context built
once: the lengths stay put) and times its replay: what removing the host's kernel launches buys, where an eager
decode step of the 0.75B shape on an H200 took 25 ms against a 0.37 ms memory floor (``gpu_check.sh``). A capture
that fails (a host read inside the forward) is reported in the table, not raised. ``--no-cuda-graph`` leaves it out.

    python benchmarks/bench_static_step.py [--model DIR | --size tiny|small|real] [--batch 1,8] [--clean N]
        [--noisy M] [--threads 1] [--dtype auto|float32|bfloat16] [--backend inductor|eager|none] [--no-freeze]
        [--no-cuda-graph] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
from _models import SIZE_HELP, SIZES, add_device_args, random_checkpoint, resolve_checkpoint, sync

import flare
from flare import masks
from flare.device import describe, pack_linears, prepare_process
from flare.engine.graphed import cache_tensors, cuda_capture
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
        return layer.k.transpose(1, 2), layer.v.transpose(1, 2)  # read whole, [B, capacity, Hkv, D]

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


def cuda_graph(fn, cache: ModelCache):
    """``fn`` captured by decoding's own capture (``flare.engine.graphed.cuda_capture``): (replay, its static
    output), or (None, the error) where capture fails. ``fn`` writes the states in place (as graphed decoding
    does); the other arms replace them, so the replay keeps the tensors it captured alive."""
    kept = cache_tensors(cache)
    try:
        replay, out = cuda_capture(fn, None)
    except Exception as e:
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"

    def replayed() -> None:
        replay()

    replayed.kept = kept  # alive while the graph can be replayed
    return replayed, out


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
        saved = fw.cache.clone()
        want = picks(model, x, context())
        _restore(fw.cache, saved)
        arms = {"eager": lambda: picks(model, x, context())}
        r = dict(batch=batch, forward=name, rows=x.shape[1], picks=want.numel())
        if args.backend != "none":
            graph = torch.compile(picks, backend=args.backend, dynamic=False, fullgraph=True)
            t0 = time.perf_counter()
            try:
                got = graph(model, x, context())
            except Exception as e:  # a benchmark reports it; decoding would fall back to eager
                sys.exit(f"{name}, batch {batch}: torch.compile ({args.backend}) failed: {type(e).__name__}: {e}")
            r.update(compile_s=time.perf_counter() - t0, same=int((got == want).sum()))
            _restore(fw.cache, saved)
            arms["compiled"] = lambda: graph(model, x, context())
        if model.device.type == "cuda" and not args.no_cuda_graph:
            ctx = context()  # built once: the lengths stay put, so every replay reads the same context
            ctx.in_place = True
            replay, got = cuda_graph(lambda: picks(model, x, ctx), fw.cache)
            if replay is None:
                r["graph_error"] = got
            else:
                _restore(fw.cache, saved)
                replay()
                torch.cuda.synchronize()
                r["graph_same"] = int((got == want).sum())
                arms["graph"] = replay
            _restore(fw.cache, saved)
        times = {arm: [] for arm in arms}
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every arm alike
            for arm, fn in arms.items():
                times[arm].append(timed(fn, args.iters, model.device))
        _restore(fw.cache, saved)
        # What a graphed decoder would still run eagerly each forward: its context (positions, rotary, masks).
        r["context_ms"] = min(timed(context, args.iters, model.device) for _ in range(args.repeats))
        out.append({**r, **{f"{arm}_ms": min(t) for arm, t in times.items()}})
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
    ap.add_argument("--backend", choices=("inductor", "eager", "none"), default="inductor",
                    help="inductor generates code; eager only traces (a check that each forward is one graph); "
                    "none: no compiled arm")
    ap.add_argument("--no-cuda-graph", action="store_true", help="on CUDA, leave the CUDA-graph arm out")
    ap.add_argument("--json", default=None, help="also write the results here")
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
    def ms(r, arm):
        return f"{r[arm + '_ms']:.3f}" if arm + "_ms" in r else "-"

    def ratio(r, arm, base="eager"):
        return f"{r[arm + '_ms'] / r[base + '_ms']:.2f}x" if arm + "_ms" in r else "-"

    print(f"\n{'batch':>5}  {'forward':12s} {'rows':>4}  {'eager ms':>9}  {'compiled ms':>11}  {'x eager':>7}  "
          f"{'compile s':>9}  {'graph ms':>9}  {'x eager':>7}  same picks (compiled, graph)")
    for r in results:
        same = "/".join(str(r[k]) if k in r else "-" for k in ("same", "graph_same", "picks"))
        print(f"{r['batch']:>5}  {r['forward']:12s} {r['rows']:>4}  {ms(r, 'eager'):>9}  {ms(r, 'compiled'):>11}  "
              f"{ratio(r, 'compiled'):>7}  {r.get('compile_s', 0):>9.1f}  {ms(r, 'graph'):>9}  "
              f"{ratio(r, 'graph'):>7}  {same}")
        if "graph_ms" in r:
            print(f"       + its context built eagerly: {r['context_ms']:.3f} ms")
        if "graph_error" in r:
            print(f"       CUDA graph capture failed: {r['graph_error']}")
    print()
    for batch in dict.fromkeys(r["batch"] for r in results):
        step, rows = (r for r in results if r["batch"] == batch)
        print(f"batch {batch}: verify forward / causal step: " + ", ".join(
            f"{arm} {rows[arm + '_ms'] / step[arm + '_ms']:.2f}x" for arm in ("eager", "compiled", "graph")
            if arm + "_ms" in step and arm + "_ms" in rows))
    print("SUMMARY: " + "; ".join([f"{arm} / eager: " + ", ".join(
        f"{r['forward']} b{r['batch']} {ratio(r, arm)}" for r in results) for arm in ("compiled", "graph")
        if any(arm + "_ms" in r for r in results)] or ["eager ms: " + ", ".join(
            f"{r['forward']} b{r['batch']} {r['eager_ms']:.3f}" for r in results)]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"describe": describe(device, dtype, model), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
