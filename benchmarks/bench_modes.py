"""Decoding speed of every mode of one FLARE checkpoint, as a ratio to causal decoding of the same model (CPU,
or ``--device cuda``).

What it measures, all in one run on one model and one set of prompts:

* for each mode of ``flare.engine.decode`` (causal, ar_trust, diffusion_trust, low_confidence, llada; each with
  its options from the checkpoint, flare.decoding.options) at batch 1 and batch ``--batch``: tokens/s and tokens per
  forward (TPF, ``DecodeResult.tokens_per_forward``: new tokens per forward a sequence took part in, prefill
  included). Fixed-length outputs, as in the paper's protocol: ``SamplingParams(temperature=0,
  max_new_tokens=N, ignore_eos=True)``; a run counts only if every completion has exactly N tokens.
  tokens/s = completion tokens / wall time of the whole ``decode()`` call (prefill included), timed with
  time.perf_counter; after one warm-up call per mode, ``--repeats`` interleaved rounds (causal, ar_trust, ...,
  causal, ...) so that background load drifts hit every mode alike; medians reported. Every ratio is to causal
  decoding at the same batch size, measured in the same run.
* AR-Trust counters: drafted and accepted draft tokens (acceptance rate), and an exactness check: at
  temperature 0 AR-Trust must emit exactly the causal (greedy AR) tokens.
* goal (printed beside the AR-Trust rows): AR-Trust >= 2.5x causal tokens/s with TPF >= 3.0 (of gen block 4), on
  a trained model. With no ``--model`` a seeded RANDOM tiny qwen3_5 model is used (mask id = vocab - 1): its
  MASK rows draft near-random tokens, so acceptance and TPF are near their floor and its ratios say nothing
  about a trained model; they only show each mode's per-forward overhead.
* cost per forward of each mode relative to a causal forward, and from it AR-Trust's speed ceiling at full
  acceptance (gen block N / that cost): a ceiling below the goal means no training can meet it at this model size
  on this machine. Then a short profile (forward hooks + torch.profiler) of one AR-Trust decode vs causal says
  where a round's time goes.

Run:  .venv/bin/python benchmarks/bench_modes.py [--model DIR] [--task arithmetic | --prompts-file F.jsonl]
          [--new-tokens 32]
          [--batch 8] [--prompt-len 32] [--threads 1] [--repeats 3] [--modes causal,ar_trust,...] [--device cuda]
``--model`` is a FLARE checkpoint directory (config.json with "flare": {"mask_token_id": ...});
``--prompts-file`` is JSONL with one {"prompt_ids": [...]} per line (cycled when fewer than the batch).
The default run (random model, 32 new tokens) takes about 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

import flare
from flare.decoding import OPTIONS, CausalOptions, SamplingParams, parse_modes
from flare.engine import decode

# Valid Qwen3_5TextConfig overrides for the random model ("tiny" = save_tiny_checkpoint's defaults).
SIZES = {
    "tiny": {},
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, vocab_size=1024,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, linear_num_key_heads=4,
                  linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32),
}
GOAL_SPEED, GOAL_TPF = 2.5, 3.0


def random_model(size: str, seed: int, device: str = "cpu"):
    import transformers

    from flare.testing.checkpoints import save_tiny_checkpoint

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_checkpoint(tmp, "qwen3_5", seed=seed, tokenizer=False, **SIZES[size])
        model = flare.load_model(tmp, device=device)
    model.config.mask_token_id = model.config.vocab_size - 1
    return model.eval()


def task_prompts(model_dir: str, spec: str, n: int) -> list[list[int]]:
    """Chat prompts of the first ``n`` questions of an evaluation task (flare.eval.tasks), through the
    checkpoint's tokenizer and chat template."""
    from flare.engine.llm import LLM
    from flare.eval.tasks import load_task

    llm = LLM.from_dir(model_dir)
    return [llm.chat_ids([{"role": "user", "content": item.question}]) for item in load_task(spec, limit=n).items]


def load_prompts(path: str | None, n: int, length: int, vocab: int, avoid: int, seed: int) -> list[list[int]]:
    if path:
        with open(path) as f:
            rows = [json.loads(line)["prompt_ids"] for line in f if line.strip()]
        if not rows:
            raise SystemExit(f"{path}: no prompts")
        return [list(rows[i % len(rows)]) for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (n, length), generator=gen)
    ids[ids >= avoid] += 1  # never the [MASK] id
    return ids.tolist()


def timed_decode(model, prompts, params, options):
    """(wall s, this process's CPU s, DecodeResult). With one thread the CPU time is a cross-check of the wall
    time that other processes on the machine hardly move."""
    t0, c0 = time.perf_counter(), time.process_time()
    res = decode(model, prompts, params, options)
    return time.perf_counter() - t0, time.process_time() - c0, res


def split_decode_time(model, prompts, params, mode) -> dict[str, float]:
    """Wall seconds of one decode() split into model forwards (by module kind, via forward hooks and a wrapper
    on ``model.hidden_states``) and everything outside them (sampling, verification, commits, bookkeeping)."""
    from _module_times import KINDS, module_times

    kinds = KINDS
    inner = model.hidden_states
    forward = [0.0]

    def hidden_states(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            forward[0] += time.perf_counter() - t0

    model.hidden_states = hidden_states  # instance attribute: shadows the method for this call only
    try:
        with module_times(model) as acc:
            t0 = time.perf_counter()
            decode(model, prompts, params, mode)
            acc["total"] = time.perf_counter() - t0
    finally:
        del model.hidden_states
    acc["forward"] = forward[0]
    layers = sum(acc.get(k, 0.0) for k in kinds.values())
    acc["other in forward"] = acc.get("forward", 0.0) - layers  # context, masks, cache reads, norms, embedding
    acc["outside forward"] = acc["total"] - acc.get("forward", 0.0) - acc.get("LM head", 0.0)
    return acc


def gemm_rows_cost(in_dim: int, out_dim: int, batch: int, rows: int, reps: int = 30, device: str = "cpu") -> float:
    """Time of one fp32 GEMM over ``batch * rows`` rows / over ``batch`` rows, same [out, in] weight (median of
    ``reps`` paired calls): what a forward over a round's rows costs at least, relative to a 1-row step, on this
    machine. A few weights are cycled so that a large one is read from memory, as in a real forward."""
    import torch.nn.functional as F

    weights = [torch.randn(out_dim, in_dim, device=device) for _ in range(3)]
    small, big = torch.randn(batch, in_dim, device=device), torch.randn(batch * rows, in_dim, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    ratios = []
    for i in range(reps + 3):
        w = weights[i % 3]
        sync()
        t0 = time.perf_counter()
        F.linear(small, w)
        sync()
        t1 = time.perf_counter()
        F.linear(big, w)
        sync()
        t2 = time.perf_counter()
        if i >= 3:
            ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios)


def top_ops(model, prompts, params, mode, n=6):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(model, prompts, params, mode)
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ev)
    return total / 1e6, sum(e.count for e in ev), [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in ev[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", help="FLARE checkpoint directory (needs flare.mask_token_id in config.json); "
                    "default: a seeded random tiny qwen3_5 model (ratios then say nothing about a trained model)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small",
                    help="random model size (no --model): small = hidden 256, 8 layers, vocab 1024; "
                         "tiny = hidden 64, 4 layers, vocab 96")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random model and the random prompts")
    ap.add_argument("--prompts-file", help='JSONL, one {"prompt_ids": [...]} per line (default: random ids)')
    ap.add_argument("--task", help="chat prompts from an evaluation task spec (e.g. arithmetic, "
                    "reasoning_gym:chain_sum, a GSM8K JSONL path), through --model's tokenizer")
    ap.add_argument("--prompt-len", type=int, default=32, help="length of the random prompts")
    ap.add_argument("--new-tokens", type=int, default=32, help="fixed completion length N (ignore_eos)")
    ap.add_argument("--batch", type=int, default=8, help="the larger batch (batch 1 is always measured)")
    ap.add_argument("--modes", default=",".join(OPTIONS), help="comma-separated modes, each with optional :key=value "
                    "options (low_confidence:block_size=3); causal is always included")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 1 by default: decode forwards "
                    "are small, and on a shared 2-core machine a second thread mostly adds sync cost and noise")
    ap.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds after a warm-up (median)")
    ap.add_argument("--device", default="cpu", help="where the model runs (e.g. cuda); the profile is CPU-only")
    ap.add_argument("--no-profile", action="store_true", help="skip the profile printed when AR-Trust's ceiling "
                    "is below the goal")
    a = ap.parse_args()
    try:
        parsed = parse_modes(a.modes)
    except ValueError as e:
        ap.error(str(e))
    # Labels ("low_confidence:block_size=3") name each run; "ar_trust" is AR-Trust with the checkpoint's defaults.
    spec = {o.label(): o for o in [CausalOptions(), *parsed]}
    modes = list(spec)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]

    if a.model:
        model = flare.load_model(a.model, device=a.device).eval()
        if model.config.mask_token_id is None:
            sys.exit(f"{a.model}: not a FLARE checkpoint (config.json has no flare.mask_token_id); "
                     "convert it with `flare convert` first")
        what = f"checkpoint {a.model}"
    else:
        model = random_model(a.size, a.seed, a.device)
        what = f"RANDOM seeded tiny qwen3_5 ({a.size})"
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    params = SamplingParams(temperature=0, max_new_tokens=a.new_tokens, ignore_eos=True)
    if a.task and a.prompts_file:
        ap.error("give --task or --prompts-file, not both")
    if a.task:
        if not a.model:
            ap.error("--task needs --model (its tokenizer and chat template)")
        prompts_all = task_prompts(a.model, a.task, a.batch)
    else:
        prompts_all = load_prompts(a.prompts_file, a.batch, a.prompt_len, cfg.vocab_size, cfg.mask_token_id,
                                   a.seed)

    print(f"decoding modes vs causal | torch {torch.__version__} | threads {torch.get_num_threads()} | fp32 "
          f"{a.device}")
    print(f"model: {what}, {n_params / 1e6:.2f}M params, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} "
          f"layers, vocab {cfg.vocab_size}, [MASK] id {cfg.mask_token_id}")
    source = (f"task {a.task} (chat template)" if a.task else f"file {a.prompts_file}" if a.prompts_file
              else f"random ids, length {a.prompt_len}")
    print(f"prompts: {source}; "
          f"outputs: exactly {a.new_tokens} new tokens (temperature 0, ignore_eos)")
    if not a.model:
        print("NOTE: a random model drafts badly (its MASK rows predict near-random tokens), so AR-Trust accepts "
              "almost nothing and the parallel modes' TPF/ratios here say NOTHING about a trained model; they "
              "show each mode's per-forward cost. Pass --model DIR for a converted checkpoint.")
    print(f"tokens/s = completion tokens / wall time of decode() (prefill included); median of {a.repeats} "
          f"interleaved rounds after a warm-up; ratios to causal at the same batch, same run (cpu x: the same "
          f"ratio on process CPU time, which other load on the machine hardly moves)\n")

    results = {}
    for B in sorted({1, a.batch}):
        prompts = prompts_all[:B]
        for mode in modes:  # warm-up
            timed_decode(model, prompts, params, spec[mode])
        times: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        last = {}
        for _ in range(a.repeats):
            for mode in modes:
                t, c, res = timed_decode(model, prompts, params, spec[mode])
                times[mode].append(t)
                cpu[mode].append(c)
                last[mode] = res
        for mode in modes:
            res = last[mode]
            valid = all(len(t) == a.new_tokens for t in res.token_ids)
            results[B, mode] = dict(time=statistics.median(times[mode]), spread=(min(times[mode]), max(times[mode])),
                                    cpu=statistics.median(cpu[mode]),
                                    tokens=res.new_tokens, tpf=res.tokens_per_forward, forwards=res.forwards,
                                    drafted=res.drafted, accepted=res.accepted, valid=valid, ids=res.token_ids,
                                    options=res.options)

    hdr = (f"{'mode':<28}{'batch':>6}{'tok/s':>10}{'x causal':>10}{'cpu x':>8}{'TPF':>7}{'forwards':>10}"
           f"{'ms (min-max)':>20}{'drafted':>9}{'accepted':>10}  goal")
    print(hdr)
    print("-" * len(hdr))
    for B in sorted({1, a.batch}):
        base = results[B, "causal"]
        for mode in modes:
            r = results[B, mode]
            tps = r["tokens"] / r["time"]
            ratio = base["time"] / r["time"]  # same token count: tokens/s ratio
            r["ratio"] = ratio
            r["ratio_cpu"] = base["cpu"] / r["cpu"]
            spread = f"{r['time'] * 1e3:.0f} ({r['spread'][0] * 1e3:.0f}-{r['spread'][1] * 1e3:.0f})"
            counters = (f"{r['drafted']:>9}{r['accepted']:>10}" if mode == "ar_trust" else f"{'':>19}")
            goal = ""
            if mode == "ar_trust":
                met = ratio >= GOAL_SPEED and r["tpf"] >= GOAL_TPF
                goal = (f">= {GOAL_SPEED}x & TPF >= {GOAL_TPF}: {'MET' if met else 'NOT MET'}"
                        + ("" if a.model else " (random model)"))
            flag = "" if r["valid"] else "  INVALID: a completion is not exactly N tokens"
            print(f"{mode:<28}{B:>6}{tps:>10.1f}{ratio:>9.2f}x{r['ratio_cpu']:>7.2f}x{r['tpf']:>7.2f}"
                  f"{r['forwards']:>10}{spread:>20}{counters}  {goal}{flag}")

    print()
    for B in sorted({1, a.batch}):
        if (B, "ar_trust") in results:
            r = results[B, "ar_trust"]
            rate = r["accepted"] / r["drafted"] if r["drafted"] else 0.0
            same = r["ids"] == results[B, "causal"]["ids"]
            print(f"ar_trust batch {B}: drafted {r['drafted']}, accepted {r['accepted']} ({rate:.1%}); "
                  f"tokens {'identical to' if same else 'DIFFER from'} greedy causal decoding "
                  f"({'exact, as required at temperature 0' if same else 'EXACTNESS VIOLATED'})")

    # Cost per forward: what a round of each mode costs relative to a causal step, hence AR-Trust's ceiling.
    # AR-Trust's round as it ran (gen_block from the option given, else from the checkpoint's training block).
    N = results[1, "ar_trust"]["options"].gen_block if (1, "ar_trust") in results else parse_modes("ar_trust")[
        0].resolve(model.config.trained_block).gen_block
    print("\ncost per forward (wall ms / forwards, prefill included), relative to a causal forward at the same batch:")
    for B in sorted({1, a.batch}):
        base = results[B, "causal"]
        c_ms = base["time"] / base["forwards"]
        row = []
        for mode in modes:
            r = results[B, mode]
            r["fwd_cost"] = (r["time"] / r["forwards"]) / c_ms
            row.append(f"{mode} {r['time'] / r['forwards'] * 1e3:.1f}ms ({r['fwd_cost']:.2f}x)")
        print(f"  batch {B}: " + ", ".join(row))
    ceilings = {}
    for B in sorted({1, a.batch}):
        if (B, "ar_trust") in results:
            ceilings[B] = N / results[B, "ar_trust"]["fwd_cost"]
            print(f"  batch {B}: AR-Trust speed ceiling at full acceptance (TPF {N}) = {N} / "
                  f"{results[B, 'ar_trust']['fwd_cost']:.2f} = {ceilings[B]:.2f}x causal "
                  f"({'can' if ceilings[B] >= GOAL_SPEED else 'CANNOT'} reach the {GOAL_SPEED}x goal at this model "
                  f"size on this machine, whatever the weights); TPF needed for {GOAL_SPEED}x: "
                  f"{GOAL_SPEED * results[B, 'ar_trust']['fwd_cost']:.2f}")
    rows = 2 * N - 1
    mlp = model.model.layers[0].mlp.gate_up_proj.weight
    for B in sorted({1, a.batch}):
        here = gemm_rows_cost(mlp.shape[1], mlp.shape[0], B, rows, device=a.device)
        large = gemm_rows_cost(4096, 4096, B, rows, reps=10, device=a.device)
        print(f"  batch {B}: a GEMM over {rows} rows per sequence costs {here:.1f}x one over 1 row on this machine "
              f"for this model's MLP weight ({mlp.shape[0]} x {mlp.shape[1]}), and {large:.1f}x for a "
              f"4096 x 4096 weight (about 1x where reading the weight dominates, as on a GPU at decode sizes)")
    unmet = [B for B in sorted({1, a.batch}) if (B, "ar_trust") in results and ceilings[B] < GOAL_SPEED]
    if unmet and not a.no_profile and a.device == "cpu":
        B = max(unmet)
        prompts = prompts_all[:B]
        print(f"\nprofile of one decode at batch {B} (forward hooks; wall ms; AR-Trust vs causal):")
        split = {m: split_decode_time(model, prompts, params, m) for m in ("causal", "ar_trust")}
        keys = ["attention layers", "GDN layers", "MLPs", "other in forward", "LM head", "outside forward", "total"]
        print(f"  {'part':<20}{'causal':>10}{'ar_trust':>10}{'ratio':>8}")
        for k in keys:
            c, t = split["causal"].get(k, 0.0), split["ar_trust"].get(k, 0.0)
            print(f"  {k:<20}{c * 1e3:>10.0f}{t * 1e3:>10.0f}{(t / c if c else float('nan')):>7.1f}x")
        tot, n_ops, ops = top_ops(model, prompts, params, "ar_trust")
        c_tot, c_n, _ = top_ops(model, prompts, params, "causal")
        print(f"  torch.profiler ar_trust: {n_ops} op calls, {tot:.2f}s self CPU (causal: {c_n} op calls, "
              f"{c_tot:.2f}s); top: " + ", ".join(f"{k} {t * 1e3:.0f}ms/{c}" for k, t, c in ops))
        sp, cp = split["ar_trust"], split["causal"]
        extras = sorted(keys[:-1], key=lambda k: -(sp.get(k, 0.0) - cp.get(k, 0.0)))[:2]
        r = results[B, "ar_trust"]
        print(f"diagnosis: an AR-Trust round ({2 * N - 1} rows) costs {r['fwd_cost']:.1f}x a causal step (1 row) at "
              f"batch {B} on this CPU, so even TPF {N} gives at most {ceilings[B]:.2f}x causal. Largest extras: "
              + ", ".join(f"{k} +{(sp.get(k, 0) - cp.get(k, 0)) * 1e3:.0f} ms "
                          f"({sp.get(k, 0) / max(cp.get(k, 0), 1e-9):.1f}x)" for k in extras) + ".")
        print("  (On a GPU a few-row forward costs about as much as a one-row one, so there the ceiling is set by TPF "
              "and per-round overheads; this is a statement about this CPU and model size.)")
    print(f"\nload average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end on {os.cpu_count()} CPUs")
    print(f"[{time.perf_counter() - t_start:.0f} s]")

    parts = []
    for B in sorted({1, a.batch}):
        if (B, "ar_trust") in results:
            r = results[B, "ar_trust"]
            met = r["ratio"] >= GOAL_SPEED and r["tpf"] >= GOAL_TPF
            parts.append(f"batch {B}: AR-Trust {r['ratio']:.2f}x causal tok/s, TPF {r['tpf']:.2f} "
                         f"({'MET' if met else 'NOT MET'})")
    others = ", ".join(f"{m} {results[a.batch, m]['ratio']:.2f}x" for m in modes if m not in ("causal", "ar_trust"))
    goal = f"goal AR-Trust >= {GOAL_SPEED}x causal tokens/s with TPF >= {GOAL_TPF} on a trained model"
    note = "" if a.model else " -- RANDOM model: NOT evidence either way about a trained model"
    print(f"SUMMARY: {goal}: " + "; ".join(parts) + (f"; batch {a.batch} others: {others}" if others else "")
          + note)


if __name__ == "__main__":
    main()
