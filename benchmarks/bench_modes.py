"""Decoding speed of every mode of one FLARE checkpoint, as a ratio to causal decoding of the same model (CPU,
or ``--device cuda``), in ``--dtype`` (auto: bf16 where the device computes it natively).

What it measures, all in one run on one model and one set of prompts:

* for each mode of ``flare.engine.decode`` (causal, ar_trust, diffusion_trust, low_confidence, llada; each with
  its options from the checkpoint, flare.decoding.options) at batch 1 and batch ``--batch``: tokens/s and tokens per
  forward (TPF, ``DecodeResult.tokens_per_forward``: new tokens per forward a sequence took part in, prefill
  included). Fixed-length outputs, as in the paper's protocol: ``SamplingParams(temperature=0,
  max_new_tokens=N, ignore_eos=True)``; a run counts only if every completion has exactly N tokens.
  tokens/s = completion tokens / wall time of the whole ``decode()`` call (prefill included), timed with
  time.perf_counter; after one warm-up call per mode (with ``FLARE_COMPILE``, whole decodes until one compiles no
  graph, at most ``flare.engine.compiled.WARMUPS``; their time is printed apart), ``--repeats`` interleaved rounds
  (causal, ar_trust, ..., causal, ...) so that background load drifts hit every mode alike; medians reported. Every
  ratio is to causal decoding at the same batch size, measured in the same run.
* AR-Trust counters: drafted and accepted draft tokens (acceptance rate), and an exactness check: at
  temperature 0 AR-Trust must emit exactly the causal (greedy AR) tokens. ``--temperature`` / ``--top-p`` sample
  instead, unseeded (so AR-Trust's pacer chooses its rounds, as for a request without a seed); sampled tokens are
  not compared (their law is: tests/decoding/test_ar_trust.py).
* goal (printed beside the AR-Trust rows): AR-Trust >= 2.5x causal tokens/s with TPF >= 3.0 (of gen block 4), on
  a trained model. With no ``--model`` a seeded RANDOM qwen3_5 model of ``--size`` is used (mask id = vocab - 1;
  ``real`` = Qwen3.5-0.8B-shaped: hidden 1024, 24 layers, 3 GDN : 1 gated attention, tied 248,320 vocabulary,
  0.75B parameters, built in seconds): its MASK rows draft near-random tokens, so acceptance and TPF are near
  their floor and its ratios say nothing about a trained model; they only show each mode's per-forward cost.
* cost per forward of each mode relative to a causal forward, and from it AR-Trust's speed ceiling at full
  acceptance (gen block N / that cost): a ceiling below the goal means no training can meet it at this model size
  on this machine. Then a short profile (forward hooks + torch.profiler) of one AR-Trust decode vs causal says
  where a round's time goes (CPU only), and a split of each step into its phases (plan, context, forward,
  consume, commit, host read: ``_step_phases.py``), which compiled decoding gets too (hooks would break its graphs).
* causal ms per decode step of flare vs transformers (``Qwen3_5ForCausalLM``, its pure-PyTorch GDN fallback) on
  the same weights, dtype and device, at batch 1 and ``--batch``: bench_decode.py's ``causal_step_ms``
  (``--new-tokens`` steps after a ``--prompt-len`` prompt, prefill excluded); ``--no-transformers`` skips it.

``--json PATH`` writes every number printed (benchmarks/gpu_check.sh collects it).

Run:  .venv/bin/python benchmarks/bench_modes.py [--model DIR] [--task arithmetic | --prompts-file F.jsonl]
          [--new-tokens 32]
          [--batch 8] [--prompt-len 32] [--threads 1] [--repeats 3] [--modes causal,ar_trust,...] [--device cuda]
          [--size tiny|small|real] [--dtype auto|float32|bfloat16] [--no-transformers] [--json out.json]
``--model`` is a FLARE checkpoint directory (config.json with "flare": {"mask_token_id": ...});
``--prompts-file`` is JSONL with one {"prompt_ids": [...]} per line (cycled when fewer than the batch).
The default run (random small model, 32 new tokens) takes about 2 minutes on 2 CPU cores;
``--size real --threads 2 --repeats 1 --new-tokens 8`` about 1 minute in bf16 (1.5 in float32) on 2 idle cores
(the model is built in 5-10 s), but 10-14 minutes while another process keeps one core busy, where ``--threads 1``
takes about 2.5 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack

import torch
from _models import SIZE_HELP, SIZES, add_device_args, random_checkpoint, resolve_checkpoint, sync

import flare
from flare.decoding import OPTIONS, ArTrustOptions, CausalOptions, SamplingParams, parse_modes
from flare.decoding.ar_trust import AUTO_EVERY_SLOTS
from flare.device import describe
from flare.engine import decode
from flare.engine.compiled import (WARMUPS, graphs_compiled, warm_batches, warm_forms, warm_until_compiled,
                                   warms_up)
from flare.engine.graphed import GraphedForward
from flare.testing.ties import divergences

GOAL_SPEED, GOAL_TPF = 2.5, 3.0


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
    """(wall s, this process's CPU s, DecodeResult, prefill s, s per decoding round). With one thread the CPU time
    is a cross-check of the wall time that other processes on the machine hardly move.

    A wrapper on ``model.hidden_states`` notes when each forward starts. Prefill = decode() start to the second
    forward's start; a round = one forward and everything the mode does around it (sampling, verification,
    commits) = from one forward's start to the next's (the last one: to decode()'s end). On the CPU the median
    round is returned, which a burst of load from other processes during one round hardly moves; on CUDA, where
    the host may queue a forward before the previous one ran, their mean (the time after the prefill / the
    forwards after it). None of the two when the forwards counted differ from ``DecodeResult.forwards``. Where
    decoding is graphed, every forward goes through ``GraphedForward`` (replays never call
    ``model.hidden_states``): the wrapper is on its call instead."""
    starts = []
    graphed = warms_up(model) == "CUDA graphs"
    inner = GraphedForward.__call__ if graphed else model.hidden_states

    def hidden_states(*args, **kwargs):
        starts.append(time.perf_counter())
        return inner(*args, **kwargs)

    if graphed:
        GraphedForward.__call__ = hidden_states  # put back below
    else:
        model.hidden_states = hidden_states  # instance attribute: shadows the method for this call only
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        res = decode(model, prompts, params, options)
        t1, c1 = time.perf_counter(), time.process_time()
    finally:
        if graphed:
            GraphedForward.__call__ = inner
        else:
            del model.hidden_states
    if len(starts) != res.forwards or len(starts) < 2:
        return t1 - t0, c1 - c0, res, None, None
    rounds = [b - a for a, b in zip(starts[1:], starts[2:] + [t1])]
    per_round = statistics.median(rounds) if model.device.type == "cpu" else statistics.mean(rounds)
    return t1 - t0, c1 - c0, res, starts[1] - t0, per_round


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


def print_step_phases(model, prompts, params, batch: int) -> dict:
    """Per step, ms in each phase of one decode (``_step_phases``), AR-Trust's rounds against causal steps: where a
    round's extra time goes, compiled or not (the forward's split by module needs eager forwards). Returns them per
    mode (with the steps each ran), as ``--json`` records them."""
    from _step_phases import PHASES, step_phases

    split = {}
    for mode in ("causal", "ar_trust"):
        with step_phases() as acc:
            decode(model, prompts, params, mode)
        split[mode] = acc
    c, t = split["causal"], split["ar_trust"]
    print(f"\nper step of one decode at batch {batch} (ms; causal: {c['steps']} steps, ar_trust: {t['steps']}):")
    print(f"  {'phase':<12}{'causal':>9}{'ar_trust':>10}{'extra':>9}")
    per_step = {m: {k: acc[k] / max(acc["steps"], 1) * 1e3 for k in (*PHASES, "step")} | {"steps": acc["steps"]}
                for m, acc in split.items()}
    for k in (*PHASES, "step"):
        pc, pt = per_step["causal"][k], per_step["ar_trust"][k]
        print(f"  {k:<12}{pc:>9.3f}{pt:>10.3f}{pt - pc:>+9.3f}")
    return per_step


def round_rows(options: ArTrustOptions, batch: int) -> str:
    """How many rows per sequence an AR-Trust round of ``options`` runs at ``batch``: one MASK group (2N - 1) or a
    group per acceptance point (N + N (N - 1), at most ``AUTO_EVERY_SLOTS`` sequences with redraft=auto); with the
    pacer (pause > 0) each round's kind, from a causal step's 1 row up to that."""
    N = options.gen_block
    every = options.redraft == "every" or (options.redraft == "auto" and batch <= AUTO_EVERY_SLOTS)
    most = f"{N + N * (N - 1)} rows, a MASK group per acceptance point" if every else f"{2 * N - 1} rows"
    return f"paced: 1 to {most}" if options.pause else most


def gemm_rows_cost(in_dim: int, out_dim: int, batch: int, rows: int, reps: int = 30, device="cpu",
                   dtype: torch.dtype = torch.float32) -> float:
    """Time of one GEMM over ``batch * rows`` rows / over ``batch`` rows, same [out, in] weight (median of
    ``reps`` paired calls): what a forward over a round's rows costs at least, relative to a 1-row step, on this
    machine. A few weights are cycled so that a large one is read from memory, as in a real forward."""
    import torch.nn.functional as F

    weights = [torch.randn(out_dim, in_dim, device=device, dtype=dtype) for _ in range(3)]
    small = torch.randn(batch, in_dim, device=device, dtype=dtype)
    big = torch.randn(batch * rows, in_dim, device=device, dtype=dtype)
    ratios = []
    for i in range(reps + 3):
        w = weights[i % 3]
        sync(device)
        t0 = time.perf_counter()
        F.linear(small, w)
        sync(device)
        t1 = time.perf_counter()
        F.linear(big, w)
        sync(device)
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
    from flare.device import prepare_process

    prepare_process()  # first, before torch starts its intra-op threads (flare.device)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", help="FLARE checkpoint directory (needs flare.mask_token_id in config.json); "
                    "default: the seeded random qwen3_5 model of --size (ratios then say nothing about a trained "
                    "model)")
    ap.add_argument("--size", choices=list(SIZES), default="small", help=SIZE_HELP + " (no --model)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random model and the random prompts")
    ap.add_argument("--prompts-file", help='JSONL, one {"prompt_ids": [...]} per line (default: random ids)')
    ap.add_argument("--task", help="chat prompts from an evaluation task spec (e.g. arithmetic, "
                    "reasoning_gym:chain_sum, a GSM8K JSONL path), through --model's tokenizer")
    ap.add_argument("--prompt-len", type=int, default=32, help="length of the random prompts")
    ap.add_argument("--new-tokens", type=int, default=32, help="fixed completion length N (ignore_eos)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy, and AR-Trust's "
                    "tokens are checked against causal decoding's); sampled requests are unseeded")
    ap.add_argument("--top-p", type=float, default=1.0, help="top-p of sampled requests")
    ap.add_argument("--batch", type=int, default=8, help="the larger batch (batch 1 is always measured)")
    ap.add_argument("--modes", default=",".join(OPTIONS), help="comma-separated modes, each with optional :key=value "
                    "options (low_confidence:block_size=3); causal is always included")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 1 by default: decode forwards "
                    "are small, and on a shared 2-core machine a second thread mostly adds sync cost and noise")
    ap.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds after a warm-up (median)")
    add_device_args(ap)
    ap.add_argument("--no-profile", action="store_true", help="skip the profile printed when AR-Trust's ceiling "
                    "is below the goal (it runs on the CPU only, and at --size real only with --profile)")
    ap.add_argument("--profile", action="store_true", help="profile at --size real too (four more decodes at "
                    "the larger batch: minutes on a CPU)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the causal ms/step comparison with "
                    "transformers on the same weights")
    ap.add_argument("--json", help="also write every measured number to this file")
    a = ap.parse_args()
    with ExitStack() as stack:
        run(a, ap, stack)


def run(a: argparse.Namespace, ap: argparse.ArgumentParser, stack: ExitStack) -> None:
    try:
        parsed = parse_modes(a.modes)
    except ValueError as e:
        ap.error(str(e))
    # Labels ("low_confidence:block_size=3") name each run; "ar_trust" is AR-Trust with the checkpoint's defaults.
    spec = {o.label(): o for o in [CausalOptions(), *parsed]}
    if not a.model:
        # A random model's drafts are rejected, so AR-Trust would pause into causal steps (ArTrustOptions.pause):
        # on these models the runs measure what a drafting round costs.
        spec = {k: dataclasses.replace(o, pause=0) if isinstance(o, ArTrustOptions) and o.pause == ArTrustOptions.pause
                else o for k, o in spec.items()}
    modes = list(spec)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]

    if a.model:
        ckpt = a.model
    else:
        t0 = time.perf_counter()
        ckpt = str(random_checkpoint(stack.enter_context(tempfile.TemporaryDirectory()), a.size, a.seed))
        build_s = time.perf_counter() - t0
    device, dtype = resolve_checkpoint(a, ckpt)
    t0 = time.perf_counter()
    model = flare.load_model(ckpt, device=device, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    if a.model:
        if model.config.mask_token_id is None:
            sys.exit(f"{a.model}: not a FLARE checkpoint (config.json has no flare.mask_token_id); "
                     "convert it with `flare convert` first")
        what = f"checkpoint {a.model}"
    else:
        model.config.mask_token_id = model.config.vocab_size - 1
        what = f"RANDOM seeded qwen3_5 ({a.size}; built in {build_s:.1f} s, loaded in {load_s:.1f} s)"
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    params = SamplingParams(temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.new_tokens, ignore_eos=True)
    sampling = (f"temperature {a.temperature:g}" + (f", top-p {a.top_p:g}" if a.top_p < 1 else "") + ", unseeded"
                if a.temperature > 0 else "temperature 0")
    if a.task and a.prompts_file:
        ap.error("give --task or --prompts-file, not both")
    if a.task:
        if not a.model:
            ap.error("--task needs --model (its tokenizer and chat template)")
        prompts_all = task_prompts(a.model, a.task, a.batch)
    else:
        prompts_all = load_prompts(a.prompts_file, a.batch, a.prompt_len, cfg.vocab_size, cfg.mask_token_id,
                                   a.seed)

    print(f"decoding modes vs causal | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"{describe(device, dtype, model)}")
    n_gdn = sum(t != "full_attention" for t in cfg.layer_types)
    print(f"model: {what}, {n_params / 1e6:.2f}M params, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} "
          f"layers ({n_gdn} GDN, {cfg.num_hidden_layers - n_gdn} attention), vocab {cfg.vocab_size}, "
          f"[MASK] id {cfg.mask_token_id}")
    source = (f"task {a.task} (chat template)" if a.task else f"file {a.prompts_file}" if a.prompts_file
              else f"random ids, length {a.prompt_len}")
    print(f"prompts: {source}; "
          f"outputs: exactly {a.new_tokens} new tokens ({sampling}, ignore_eos)")
    if not a.model:
        print("NOTE: a random model drafts badly (its MASK rows predict near-random tokens), so AR-Trust accepts "
              "almost nothing and the parallel modes' TPF/ratios here say NOTHING about a trained model; they "
              "show each mode's per-forward cost (AR-Trust with pause=0: every round drafts). Pass --model DIR "
              "for a converted checkpoint.")
    print(f"tokens/s = completion tokens / wall time of decode() (prefill included); median of {a.repeats} "
          f"interleaved rounds after a warm-up; ratios to causal at the same batch, same run (cpu x: the same "
          f"ratio on process CPU time, which other load on the machine hardly moves)\n")

    sections = {"model": time.perf_counter() - t_start}
    t_modes = time.perf_counter()
    results = {}
    # Warm-ups are short (4-token prompts, 2 new tokens): they only need each mode's code path to have run once.
    warm = dataclasses.replace(params, max_new_tokens=min(a.new_tokens, 2))
    compiling = warms_up(model) is not None
    for B in sorted({1, a.batch}):
        prompts = prompts_all[:B]
        for mode in modes:
            t0 = time.perf_counter()
            timed_decode(model, [p[:4] for p in prompts], warm, spec[mode])
            # Compiled (FLARE_COMPILE): whole decodes until one compiles no graph, so that no timed round waits
            # for the compiler (AR-Trust's pacer meets new kinds of rounds, and sizes turn dynamic, over several).
            # With graphs per shape: each kind its pacer may try, pinned (``warm_forms``), over each power of two
            # of the batch's slots (AR-Trust's sequences end in different rounds: a batch's last ones cover fewer
            # slots), the slots past n ending at their first token.
            for n in warm_batches(B)[:-1] + [B]:
                each = [params if i < n else dataclasses.replace(params, max_new_tokens=1) for i in range(B)]
                for form in warm_forms(model, spec[mode], n):
                    warm_until_compiled(model, lambda: timed_decode(model, prompts, each, form))
            if compiling:
                sections["compile warm-up"] = sections.get("compile warm-up", 0.0) + time.perf_counter() - t0
        times: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        prefill: dict[str, list[float]] = {m: [] for m in modes}
        rounds: dict[str, list[float]] = {m: [] for m in modes}
        last = {}
        for _ in range(a.repeats):
            for mode in modes:
                t, c, res, pre, per_round = timed_decode(model, prompts, params, spec[mode])
                times[mode].append(t)
                cpu[mode].append(c)
                if per_round is not None:
                    prefill[mode].append(pre)
                    rounds[mode].append(per_round)
                last[mode] = res
        for mode in modes:
            res = last[mode]
            valid = all(len(t) == a.new_tokens for t in res.token_ids)
            results[B, mode] = dict(time=statistics.median(times[mode]), spread=(min(times[mode]), max(times[mode])),
                                    cpu=statistics.median(cpu[mode]),
                                    tokens=res.new_tokens, tpf=res.tokens_per_forward, forwards=res.forwards,
                                    drafted=res.drafted, accepted=res.accepted, valid=valid, ids=res.token_ids,
                                    options=res.options, forward=res.kernel_paths.get("compile", "eager"),
                                    prefill_ms=statistics.median(prefill[mode]) * 1e3 if prefill[mode] else None,
                                    round_ms=statistics.median(rounds[mode]) * 1e3 if rounds[mode] else None)

    sections["modes"] = time.perf_counter() - t_modes - sections.get("compile warm-up", 0.0)
    if compiling:
        graphs = model.compiles if warms_up(model) == "CUDA graphs" else graphs_compiled()
        print(f"compiled ({warms_up(model)}): {graphs} graphs, {sections['compile warm-up']:.0f} s of "
              f"warm-ups (per mode and batch: a short decode, then whole ones until one compiled nothing, at most "
              f"{WARMUPS})\n")
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
            # Sampled tokens are not compared (their law is tested in tests/decoding): exact is None.
            same = r["exact"] = None if a.temperature > 0 else r["ids"] == results[B, "causal"]["ids"]
            verdict = ("sampled (not compared: they follow the causal law, tested in tests/decoding)" if same is None
                       else "identical to greedy causal decoding (exact, as required at temperature 0)")
            if same is False:
                # The first differing position of each sequence that differs, None where it is no near-tie.
                ties = [cut if tie else None for cut, tie in
                        divergences(model, prompts_all[:B], results[B, "causal"]["ids"], r["ids"])]
                r["near_ties"] = ties
                verdict = (f"identical to greedy causal decoding up to a near-tie in every differing sequence "
                           f"({len(ties)}: two tokens within {model.dtype}'s logit tolerance, where greedy may "
                           "take either)" if all(t is not None for t in ties) else
                           "DIFFERENT from greedy causal decoding before any near-tie: EXACTNESS VIOLATED")
            print(f"ar_trust batch {B}: drafted {r['drafted']}, accepted {r['accepted']} ({rate:.1%}); "
                  f"tokens {verdict}")

    # Cost per forward: what a round of each mode costs relative to a causal step, hence AR-Trust's ceiling.
    # AR-Trust's round as it ran (gen_block from the option given, else from the checkpoint's training block).
    N = results[1, "ar_trust"]["options"].gen_block if (1, "ar_trust") in results else parse_modes("ar_trust")[
        0].resolve(model.config.trained_block).gen_block
    batches = sorted({1, a.batch})
    for B in batches:
        base = results[B, "causal"]
        for mode in modes:
            r = results[B, mode]
            r["fwd_ms_with_prefill"] = r["time"] / r["forwards"] * 1e3
            r["fwd_cost_with_prefill"] = r["fwd_ms_with_prefill"] / (base["time"] / base["forwards"] * 1e3)
            # Decoding rounds only (timed_decode: from the second forward's start on), else with the prefill.
            r["fwd_ms"] = r["round_ms"] if r["round_ms"] is not None else r["fwd_ms_with_prefill"]
        for mode in modes:
            results[B, mode]["fwd_cost"] = results[B, mode]["fwd_ms"] / base["fwd_ms"]
    prefill_ms = {B: results[B, "causal"]["prefill_ms"] for B in batches}
    print(f"\ncost per forward relative to a causal forward at the same batch: ms of a decoding round (one "
          f"forward and the mode's work around it, median on a CPU) after the prefill (causal prefill: "
          f"{', '.join(f'B={B} {prefill_ms[B]:.0f} ms' for B in batches if prefill_ms[B] is not None)}); in "
          f"brackets: decode() wall time / forwards, the prefill included")
    print(f"  {'mode':<28}" + "".join(f"{f'B={B} ms':>10}{'x causal':>10}{'(incl.)':>9}" for B in batches))
    for mode in modes:
        cells = []
        for B in batches:
            r = results[B, mode]
            incl = f"({r['fwd_cost_with_prefill']:.2f}x)"
            cells.append(f"{r['fwd_ms']:>10.1f}{r['fwd_cost']:>9.2f}x{incl:>9}")
        print(f"  {mode:<28}" + "".join(cells))
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
        here = gemm_rows_cost(mlp.shape[1], mlp.shape[0], B, rows, device=device, dtype=dtype)
        large = gemm_rows_cost(4096, 4096, B, rows, reps=10, device=device, dtype=dtype)
        print(f"  batch {B}: a GEMM over {rows} rows per sequence costs {here:.1f}x one over 1 row on this machine "
              f"for this model's MLP weight ({mlp.shape[0]} x {mlp.shape[1]}), and {large:.1f}x for a "
              f"4096 x 4096 weight (about 1x where reading the weight dominates, as on a GPU at decode sizes)")
    unmet = [B for B in sorted({1, a.batch}) if (B, "ar_trust") in results and ceilings[B] < GOAL_SPEED]
    profile = None  # what the profile below measured, for --json
    skip_real = not a.model and a.size == "real" and not a.profile
    B = max(unmet, default=1)  # the batch a profile runs at
    prompts = prompts_all[:B]
    if unmet and not a.no_profile and device.type == "cpu" and skip_real:
        print("  (profile skipped at --size real: --profile runs it)")
    elif unmet and not a.no_profile and device.type == "cpu" and compiling:
        print("  (forward hooks skipped when compiled: they would break the graphs)")
        profile = dict(batch=B, step_phases_ms=print_step_phases(model, prompts, params, B))
    elif unmet and not a.no_profile and device.type == "cpu":
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
        print(f"diagnosis: an AR-Trust round ({round_rows(r['options'], B)}) costs {r['fwd_cost']:.1f}x a causal step (1 row) at "
              f"batch {B} on this CPU, so even TPF {N} gives at most {ceilings[B]:.2f}x causal. Largest extras: "
              + ", ".join(f"{k} +{(sp.get(k, 0) - cp.get(k, 0)) * 1e3:.0f} ms "
                          f"({sp.get(k, 0) / max(cp.get(k, 0), 1e-9):.1f}x)" for k in extras) + ".")
        print("  (On a GPU a few-row forward costs about as much as a one-row one, so there the ceiling is set by TPF "
              "and per-round overheads; this is a statement about this CPU and model size.)")
        profile = dict(batch=B, forward_split_ms={m: {k: v * 1e3 for k, v in split[m].items()} for m in split},
                       step_phases_ms=print_step_phases(model, prompts, params, B))
    t_versus = time.perf_counter()
    versus = {"skipped": "--no-transformers"} if a.no_transformers else transformers_comparison(
        model, ckpt, device, dtype, a, batches)
    sections["transformers comparison"] = time.perf_counter() - t_versus
    load_end = os.getloadavg()[0]
    elapsed = time.perf_counter() - t_start
    print(f"\nload average {load_start:.2f} at start, {load_end:.2f} at end on {os.cpu_count()} CPUs")
    busy = max(load_start, load_end) > (os.cpu_count() or 1) + 0.5
    if device.type == "cpu" and torch.get_num_threads() > 1 and busy:
        print(f"WARNING: other processes held the CPUs during this run; with --threads {torch.get_num_threads()} "
              "> 1 every parallel op waits for a descheduled thread, so times (and ratios between modes timed "
              "minutes apart) can swing several-fold: on a shared machine --threads 1 is the steadier measure")
    print(f"[{elapsed:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in sections.items()) + "]")

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
    if a.json:
        keep = ("forward", "time", "cpu", "tokens", "tpf", "forwards", "drafted", "accepted", "valid", "exact", "ratio",
                "ratio_cpu", "prefill_ms", "round_ms", "fwd_ms", "fwd_cost", "fwd_ms_with_prefill",
                "fwd_cost_with_prefill")
        record = dict(
            benchmark="bench_modes", describe=describe(device, dtype, model), device=str(device),
            dtype=str(dtype).removeprefix("torch."), torch=torch.__version__, threads=torch.get_num_threads(),
            model=dict(what=what, size=None if a.model else a.size, params=n_params, hidden=cfg.hidden_size,
                       layers=cfg.num_hidden_layers, gdn_layers=n_gdn, vocab=cfg.vocab_size,
                       mask_token_id=cfg.mask_token_id),
            new_tokens=a.new_tokens, temperature=a.temperature, top_p=a.top_p, prompt_len=a.prompt_len,
            repeats=a.repeats, batches=batches,
            prefill_ms={str(B): prefill_ms[B] for B in batches}, ar_trust_gen_block=N,
            ar_trust_ceiling={str(B): c for B, c in ceilings.items()},
            modes=[dict(mode=m, batch=B, tok_s=results[B, m]["tokens"] / results[B, m]["time"],
                        **{k: results[B, m][k] for k in keep if k in results[B, m]}) for B in batches for m in modes],
            profile=profile, transformers=versus, load_average=[load_start, load_end], elapsed_s=elapsed,
            sections_s=sections)
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {a.json}")


def transformers_comparison(model, ckpt: str, device: torch.device, dtype: torch.dtype, a: argparse.Namespace,
                            batches: list[int]) -> list[dict] | dict:
    """Causal ms per decode step of flare and of transformers on the same weights (bench_decode.causal_step_ms);
    prints a table, returns its rows (or why it could not run)."""
    import gc

    import transformers
    from _models import load_transformers
    from bench_decode import causal_step_ms

    try:
        hf = load_transformers(ckpt, device, dtype)
    except Exception as e:  # a checkpoint transformers cannot load: say so, keep the rest of the run
        print(f"\ntransformers comparison skipped: {type(e).__name__}: {e}")
        return {"skipped": f"{type(e).__name__}: {e}"}
    cfg = model.config
    prompts = load_prompts(None, max(batches), a.prompt_len, cfg.vocab_size, cfg.mask_token_id, a.seed + 1)
    ids = {B: torch.tensor(prompts[:B], device=device) for B in batches}
    steps = max(a.new_tokens, 2)
    # Like for like: flare's LM head never predicts [MASK] (its logit is -inf), transformers' has no such row.
    mask_id, cfg.mask_token_id = cfg.mask_token_id, None
    try:
        rows = causal_step_ms(model, hf, ids, steps, max(a.repeats, 1))
    finally:
        cfg.mask_token_id = mask_id
    hf_name = type(hf).__name__
    del hf
    gc.collect()
    print(f"\ncausal decode ms/step, flare vs transformers {transformers.__version__} ({hf_name} with "
          f"its pure-PyTorch GDN fallback), same weights, {describe(device, dtype, model)}: {steps - 1} cached greedy steps "
          f"after a {a.prompt_len}-token prompt, prefill excluded, paired runs (bench_decode.causal_step_ms)")
    print(f"  {'batch':>5}{'flare ms':>11}{'transformers ms':>17}{'flare/hf':>10}  greedy tokens")
    for r in rows:
        same = "identical" if not r["differ"] else f"{r['differ']} of {r['tokens']} differ"
        print(f"  {r['batch']:>5}{r['flare_ms']:>11.1f}{r['transformers_ms']:>17.1f}{r['ratio']:>9.2f}x  {same}")
    if dtype != torch.float32 and any(r["differ"] for r in rows):
        print("  (in reduced precision the two implementations round differently, so a greedy path can part at a "
              "near-tie; --dtype float32 is the exactness check)")
    return [{k: v for k, v in r.items() if not k.endswith("_tokens")} for r in rows]


if __name__ == "__main__":
    main()
