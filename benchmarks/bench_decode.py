"""Decode and prefill speed of flare vs transformers on the same Qwen3.5 hybrid weights (CPU or CUDA).

What it measures, all in one run on one seeded checkpoint (built with flare.testing.checkpoints; ``--size real``
is Qwen3.5-0.8B-shaped), both sides in the same ``--dtype`` on the same ``--device``:

* ms per greedy decode step, batch 1 and batch ``--batch`` (``--steps`` new tokens after a ``--prompt-len``-token
  prompt, 64 by default: at longer contexts attention weighs more).
  Like-for-like measure: a manual loop on each side, one forward of the new token against the model's cache
  plus an argmax (``flare.ops.sampling.argmax`` on both sides: decoding's, where ``torch.argmax`` over a bf16
  row of 248,320 logits runs on one thread; flare: ``model.hidden_states(tok, cache=cache)`` + ``model.logits``
  under ``frozen_weights`` as decoding's runners; transformers:
  ``model(tok, cache=cache)`` reading ``out.cache``). Prefill is excluded; only the decode steps are timed.
  ``generate()`` is not the primary measure because its per-step logits processors / stopping criteria are
  overhead flare's loop does not have; the end-to-end ``flare.engine.decode`` vs ``model.generate`` time
  (prefill included, per new token) is printed as an extra row.
* prefill tokens/s, batch 1, a 512-token prompt (one forward filling a fresh cache, logits of the last row only;
  flare's under ``frozen_weights``, as a decoding runner prefills).

Each ratio is flare / transformers *time* (so < 1 means flare is faster); the goal printed next to the decode
rows is flare <= 0.5x transformers' time per step. Every number is the median of ``--repeats`` timed runs after
a warm-up run. A correctness line checks that both produce the same greedy tokens.

Run:  python benchmarks/bench_decode.py [--size tiny|small|real] [--steps 128] [--batch 8] [--threads N]
          [--device cuda] [--dtype auto|float32|bfloat16]
``causal_step_ms`` (the decode rows) is what bench_modes.py imports for its flare-vs-transformers line.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _models import (SIZE_HELP, SIZES, add_device_args, load_transformers, random_checkpoint, resolve_checkpoint,
                     sync)

import flare
from flare.decoding import SamplingParams
from flare.device import describe, pack_linears
from flare.engine import decode
from flare.model import frozen_weights
from flare.model.packed_linear import prepack
from flare.ops.sampling import argmax

PROMPT_LEN, PREFILL_LEN, DECODE_GOAL = 64, 512, 0.5


def wall(fn):
    """Wrap ``fn`` so that it returns (its wall time in s, its result)."""
    def run():
        t0 = time.perf_counter()
        result = fn()
        sync(_device(result))
        return time.perf_counter() - t0, result
    return run


def paired(fn_a, fn_b, repeats: int):
    """Warm each up once, then alternate timed calls (a, b, a, b, ...) so background load hits both alike.

    Each fn returns (seconds, result). Returns the median seconds of each and the last result of each.
    """
    fn_a(), fn_b()
    runs_a, runs_b = [], []
    for _ in range(repeats):
        runs_a.append(fn_a())
        runs_b.append(fn_b())
    return (statistics.median(t for t, _ in runs_a), statistics.median(t for t, _ in runs_b),
            runs_a[-1][1], runs_b[-1][1])


def _device(result) -> torch.device:
    """The device a timed call's result lives on (tensors, a tuple of them, or a DecodeResult: the CPU)."""
    first = result[0] if isinstance(result, tuple) else result
    return first.device if isinstance(first, torch.Tensor) else torch.device("cpu")


# -- flare ------------------------------------------------------------------------------------------------------
def flare_prefill(model, ids, steps):
    cache = model.new_cache(ids.shape[0], capacity=ids.shape[1] + steps)
    with frozen_weights():  # as decoding's runners prefill: packed linears, weight-derived values kept
        last = model.hidden_states(ids, cache=cache)[:, -1]
        return argmax(model.logits(last)), cache


def flare_steps(model, tok, cache, steps):
    """``steps - 1`` decode forwards (the first token comes from prefill). Returns the time and all tokens."""
    out = [tok]
    t0 = time.perf_counter()
    with frozen_weights():  # what flare's decoding runners run under: weight-derived values kept across steps
        for _ in range(steps - 1):
            tok = argmax(model.logits(model.hidden_states(tok[:, None], cache=cache)[:, 0]))
            out.append(tok)
    sync(tok.device)
    return time.perf_counter() - t0, torch.stack(out, 1)


# -- transformers ------------------------------------------------------------------------------------------------
def hf_prefill(model, ids, steps):
    out = model(ids, use_cache=True, logits_to_keep=1)
    return argmax(out.logits[:, -1]), out.cache


def hf_steps(model, tok, cache, steps):
    out = [tok]
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        res = model(tok[:, None], cache=cache, use_cache=True)
        cache = res.cache
        tok = argmax(res.logits[:, -1])
        out.append(tok)
    sync(tok.device)
    return time.perf_counter() - t0, torch.stack(out, 1)


def decode_run(prefill, steps_fn, model, ids, steps):
    """One untimed prefill, then the timed decode steps: (seconds, tokens [B, steps])."""
    return lambda: steps_fn(model, *prefill(model, ids, steps), steps)


def causal_step_ms(fm, hf, ids_by_batch: dict[int, torch.Tensor], steps: int, repeats: int) -> list[dict]:
    """Per batch: ms per cached greedy decode step of flare and of transformers (``steps - 1`` timed steps after
    an untimed prefill of the ids, paired and interleaved, median of ``repeats``), and whether both produced the
    same greedy tokens."""
    out = []
    with torch.no_grad():
        for B, ids in ids_by_batch.items():
            f_s, h_s, f_tok, h_tok = paired(decode_run(flare_prefill, flare_steps, fm, ids, steps),
                                            decode_run(hf_prefill, hf_steps, hf, ids, steps), repeats)
            f_ms, h_ms = 1e3 * f_s / (steps - 1), 1e3 * h_s / (steps - 1)
            out.append(dict(batch=B, flare_ms=f_ms, transformers_ms=h_ms, ratio=f_ms / h_ms,
                            tokens=f_tok.numel(), differ=int((f_tok != h_tok).sum()), flare_tokens=f_tok,
                            transformers_tokens=h_tok))
    return out


def random_ids(gen: torch.Generator, vocab: int, batch: int, length: int, device) -> torch.Tensor:
    """Prompt ids in [4, vocab - 1): never the last id, which the benchmarks' random models use as [MASK]."""
    return torch.randint(4, vocab - 1, (batch, length), generator=gen).to(device)


def main() -> None:
    from flare.device import prepare_process

    prepare_process()  # first, before torch starts its intra-op threads (flare.device)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="tiny", help=SIZE_HELP)
    ap.add_argument("--steps", type=int, default=128, help="new tokens per decode run (after --prompt-len tokens)")
    ap.add_argument("--prompt-len", type=int, default=PROMPT_LEN, help="prompt tokens before the decode steps")
    ap.add_argument("--batch", type=int, default=8, help="the larger decode batch (batch 1 is always measured)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 1 by default because at "
                    "these sizes every op is tiny and intra-op threads add only sync cost and noise")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median taken)")
    ap.add_argument("--prefill-len", type=int, default=PREFILL_LEN, help="prompt tokens for the prefill test")
    add_device_args(ap)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2")
    torch.set_num_threads(args.threads)
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        random_checkpoint(tmp, args.size, seed=0)
        device, dtype = resolve_checkpoint(args, tmp)
        fm = flare.load_model(tmp, device=device, dtype=dtype).eval()
        if pack_linears(device, dtype):
            prepack(fm)  # as decoding's runners do (the engine's Stepper); the manual loops below run on it
        hf = load_transformers(tmp, device, dtype)
    cfg = fm.config
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"flare vs transformers {transformers.__version__} | torch {torch.__version__} | threads "
          f"{torch.get_num_threads()} | {describe(device, dtype, fm)} | size {args.size}: "
          f"{n_params / 1e6:.2f}M params, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers "
          f"({sum(t != 'full_attention' for t in cfg.layer_types)} GDN), vocab {cfg.vocab_size}")
    print("both run pure-PyTorch kernels (transformers: its torch fallbacks for the GDN conv and recurrence)")
    print("decode measure: manual greedy loop, one cached forward + argmax (decoding's, flare.ops.sampling) per "
          "step on both sides, prefill excluded (the like-for-like measure; generate()/decode() end-to-end shown "
          "separately)\n")

    gen = torch.Generator().manual_seed(0)
    rows, checks, decode_ratios = [], [], []
    ids_by_batch = {B: random_ids(gen, cfg.vocab_size, B, args.prompt_len, device) for B in sorted({1, args.batch})}
    for r in causal_step_ms(fm, hf, ids_by_batch, args.steps, args.repeats):
        B = r["batch"]
        rows.append((f"decode ms/step  B={B}", r["flare_ms"], r["transformers_ms"], "ms", r["ratio"]))
        decode_ratios.append(r["ratio"])
        checks.append((f"loop B={B}", r["flare_tokens"], r["transformers_tokens"]))

    # End-to-end library APIs, batch --batch, prefill included, per new token.
    with torch.no_grad():
        B = args.batch
        ids = random_ids(gen, cfg.vocab_size, B, args.prompt_len, device)
        params = SamplingParams(temperature=0, max_new_tokens=args.steps, ignore_eos=True)
        f_s, h_s, f_res, h_out = paired(
            wall(lambda: decode(fm, ids.tolist(), params)),
            wall(lambda: hf.generate(ids, max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False,
                                     pad_token_id=0)), args.repeats)
        rows.append((f"e2e ms/token    B={B}", 1e3 * f_s / args.steps, 1e3 * h_s / args.steps, "ms", f_s / h_s))
        checks.append((f"decode()/generate() B={B}", torch.tensor(f_res.token_ids), h_out[:, args.prompt_len:].cpu()))

        # Prefill throughput, batch 1.
        ids = random_ids(gen, cfg.vocab_size, 1, args.prefill_len, device)
        f_s, h_s, f_first, h_first = paired(wall(lambda: flare_prefill(fm, ids, 1)[0]),
                                            wall(lambda: hf_prefill(hf, ids, 1)[0]), args.repeats)
        T = args.prefill_len
        rows.append((f"prefill tok/s   T={T}", T / f_s, T / h_s, "tok/s", f_s / h_s))
        checks.append((f"prefill argmax T={T}", f_first[:, None], h_first[:, None]))

    print(f"{'measure':<22}{'flare':>12}{'transformers':>14}  {'unit':<6}{'flare/hf time':>14}  goal")
    for name, f, h, unit, ratio in rows:
        goal = ""
        if name.startswith("decode"):
            goal = f"<= {DECODE_GOAL}x  {'MET' if ratio <= DECODE_GOAL else 'NOT MET'}"
        print(f"{name:<22}{f:>12.2f}{h:>14.2f}  {unit:<6}{ratio:>13.2f}x  {goal}")

    print()
    all_ok = True
    for name, a, b in checks:
        a, b = a.cpu(), b.cpu()
        same = a.shape == b.shape and bool((a == b).all())
        all_ok &= same
        detail = f"{tuple(a.shape)} tokens identical" if same else (
            f"MISMATCH: {int((a != b).sum())} of {a.numel()} differ" if a.shape == b.shape
            else f"MISMATCH: shapes {tuple(a.shape)} vs {tuple(b.shape)}")
        print(f"correctness {name:<26} {detail}")

    if dtype != torch.float32 and not all_ok:
        print(f"(in {str(dtype).removeprefix('torch.')} the two implementations round differently, so a greedy path "
              "can part at a near-tie and differ from there on; --dtype float32 is the exactness check)")
    worst = max(decode_ratios)
    print(f"\nSUMMARY: decode flare/hf time per step {', '.join(f'{r:.2f}x' for r in decode_ratios)} "
          f"(goal <= {DECODE_GOAL}x: {'MET' if worst <= DECODE_GOAL else 'NOT MET'}), prefill {rows[-1][4]:.2f}x, "
          f"greedy tokens {'match' if all_ok else 'DIFFER'}")


if __name__ == "__main__":
    main()
