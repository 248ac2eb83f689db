"""Peak memory of one FLARE training step at Qwen3.5-2B width and vocabulary: before and after the training-at-
scale changes, against the floor, with the `flare train --dry-run` estimate beside it.

The model: a seeded random Qwen3.5-shaped hybrid stored in bf16 (``save_random_hybrid``), hidden 2,048,
intermediate 6,144, tied vocabulary 248,320, two decoder layers (one Gated DeltaNet, one gated attention),
converted (a [MASK] row). One row of ``--length`` tokens (one fully supervised document), FLARE objective (block
``--block-size``, two complementary views sharing the clean stream), bf16 compute. Each arm runs two steps (the
first creates the optimizer state) in a fresh process, whose peak resident set (VmHWM) is reported:

* after: the training path as it is (fp32 master parameters, bf16 autocast, chunked loss, activation
  checkpointing by the config's rule, fused AdamW): exactly ``flare train``'s step functions.
* before: the path as it was (parameters trained in their stored bf16, full-vocabulary logits and their fp32
  copy in the loss, no checkpointing, AdamW's default kernel), at ``--before-lengths`` (it does not fit in memory
  at 4,096 on a 24 GiB machine) and extrapolated linearly in the length to ``--length``.
* estimate: ``flare train --dry-run``'s peak for the after arm (replayed on fake tensors, nothing allocated).
* floor: bf16 weights + fp32 master + fp32 gradients + AdamW's two fp32 moments + one fp32 logits chunk + the
  checkpointed activations (each layer's fp32 input over the (1 + views) L rows) + the process's runtime.

Goals (issue: training at scale): after <= 1.3x floor, after <= before / 8, estimate within 15% of after.

Run:  .venv/bin/python benchmarks/bench_train_memory.py [--length 4096] [--before-lengths 512,1024]
          [--hidden 2048 --layers 2 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import flare.objective.loss as loss_module
from flare.checkpoint import load_model
from flare.config import ModelConfig
from flare.device import describe
from flare.objective import FlareObjective
from flare.ops.linear_ce import CHUNK_BYTES, linear_cross_entropy_reference
from flare.testing.checkpoints import save_random_hybrid
from flare.train.config import TrainConfig, from_dict
from flare.train.loop import backward, make_optimizer, optimizer_step
from flare.train.memory import GIB, estimate, resident_bytes, synthetic_batch

QWEN3_5_2B_WIDTH = dict(vocab_size=248_320, hidden_size=2048, intermediate_size=6144, num_attention_heads=8,
                        num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
                        linear_key_head_dim=128, linear_value_head_dim=128, tie_word_embeddings=True)


def peak_bytes(device: torch.device) -> int:
    """The process's peak resident set on CPU; the allocator's peak on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resident_bytes(peak=True)


def train_config(model: str, length: int, block_size: int, after: bool) -> TrainConfig:
    return from_dict(TrainConfig, {
        "model": model, "data": {"train": [], "seq_len": length}, "batch_size": 1, "bf16": True,
        "objective": {"block_size": block_size}, "fp32_master": after,
        **({} if after else {"activation_checkpointing": False}),
    })


def run_arm(args: argparse.Namespace) -> dict:
    """Two steps of one arm in this process; its peak RSS and step time."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    after = args.arm in ("after", "estimate")  # the estimate is of the after arm's config
    cfg = train_config(args.model, args.length, args.block_size, after)
    runtime = resident_bytes() if device.type == "cpu" else 0
    if args.arm == "estimate":
        est = estimate(cfg, compare_checkpointing=False)
        return {"peak": est.peak, "runtime": runtime}
    if not after:
        # The loss as it was: full-vocabulary logits (and their fp32 copy) for every scored row.
        def full_logits(h, w, t, groups, num_groups, masked_id=None):
            return torch.stack([linear_cross_entropy_reference(h[groups == g], w, t[groups == g], masked_id=masked_id)
                                for g in range(num_groups)])

        loss_module.linear_cross_entropy_sums = full_logits
    model = load_model(args.model, device=device)
    if after:
        model.float()
    model.gradient_checkpointing = cfg.checkpointing
    model.train()
    optimizer = make_optimizer(model, cfg) if after else torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    objective = FlareObjective(cfg.objective, model.config.mask_token_id)
    batch = synthetic_batch(cfg, model.config.vocab_size, model.config.mask_token_id).to(device)
    views = objective.views(batch, row_seeds=[0])
    times = []
    for _ in range(2):
        start = time.perf_counter()
        backward(model, objective, batch, views, cfg)
        optimizer_step(model, optimizer, cfg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {"peak": peak_bytes(device), "runtime": runtime, "step_s": times[-1],
            "tokens_per_s": cfg.row_tokens / times[-1], "checkpointing": cfg.checkpointing}


def subprocess_arm(args: argparse.Namespace, arm: str, length: int) -> dict:
    cmd = [sys.executable, __file__, "--arm", arm, "--model", args.model, "--length", str(length),
           "--block-size", str(args.block_size), "--threads", str(args.threads), "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1], "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def floor_bytes(config: ModelConfig, length: int, runtime: int) -> dict[str, int]:
    from flare.model import FlareModel

    with torch.device("meta"):
        n = sum(p.numel() for p in FlareModel(config).parameters())
    rows = 3 * length  # clean stream + two views
    parts = {
        "bf16 weights": 2 * n, "fp32 master": 4 * n, "fp32 gradients": 4 * n, "AdamW moments": 8 * n,
        "one logits chunk": CHUNK_BYTES,
        "checkpointed activations": 4 * rows * config.hidden_size * (config.num_hidden_layers + 1),
        "runtime": runtime,
    }
    parts["floor"] = sum(parts.values())
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4096, help="tokens per row (L); the forward row holds 3 L")
    ap.add_argument("--before-lengths", default="512,1024", help="lengths the before arm runs at (extrapolated)")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=QWEN3_5_2B_WIDTH["hidden_size"])
    ap.add_argument("--intermediate", type=int, default=QWEN3_5_2B_WIDTH["intermediate_size"])
    ap.add_argument("--vocab", type=int, default=QWEN3_5_2B_WIDTH["vocab_size"])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers, alternating Gated DeltaNet / attention")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--model", help="a FLARE checkpoint to use instead of the random one")
    ap.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (the allocator's peak)")
    ap.add_argument("--arms", default="after,estimate,before", help="which of after, estimate, before to run")
    ap.add_argument("--arm", choices=("after", "before", "estimate"), help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            shape = {**QWEN3_5_2B_WIDTH, "vocab_size": args.vocab, "hidden_size": args.hidden,
                     "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
                     "full_attention_interval": 2}
            args.model = str(save_random_hybrid(Path(tmp) / "model", mask_token_id=args.vocab - 1, **shape))
        config = ModelConfig.from_file(args.model)
        arms = set(args.arms.split(","))
        print(f"{describe(torch.device(args.device), torch.bfloat16)}, {args.threads} threads; model: hidden "
              f"{config.hidden_size}, {config.num_hidden_layers} layers, vocab {config.vocab_size:,}, stored bf16; "
              f"one row of L = {args.length:,} (forward row {3 * args.length:,}), FLARE, bf16 compute")
        results: dict = {"length": args.length, "device": args.device, "layers": config.num_hidden_layers}
        after = results["after"] = subprocess_arm(args, "after", args.length)
        if "estimate" in arms:
            results["estimate"] = subprocess_arm(args, "estimate", args.length)
        before = results["before"] = {L: subprocess_arm(args, "before", L)
                                      for L in (int(x) for x in args.before_lengths.split(","))} \
            if "before" in arms else {}
        ok = sorted((L, r["peak"]) for L, r in before.items() if "peak" in r)
        if len(ok) >= 2:
            (l0, p0), (l1, p1) = ok[0], ok[-1]
            results["before_extrapolated"] = p0 + (p1 - p0) * (args.length - l0) / (l1 - l0)
        if "peak" not in after:
            print(f"after arm failed: {after}")
            return
        floor = results["floor"] = floor_bytes(config, args.length, after["runtime"])

        def gib(x: float) -> str:
            return f"{x / GIB:8.2f} GiB"

        print(f"\nfloor at L = {args.length:,}:")
        for name, value in floor.items():
            print(f"  {name:<26}{gib(value)}")
        print(f"\nmeasured peak {'RSS' if args.device == 'cpu' else 'allocated'} (two steps, fresh process each):")
        for L, r in sorted(before.items()):
            print(f"  before, L = {L:<6,}          {gib(r['peak']) if 'peak' in r else r['error']}")
        if "before_extrapolated" in results:
            print(f"  before, L = {args.length:<6,} (extrapolated) {gib(results['before_extrapolated'])}")
        print(f"  after,  L = {args.length:<6,}          {gib(after['peak'])}   "
              f"(checkpointing {'on' if after['checkpointing'] else 'off'}, step {after['step_s']:.2f} s, "
              f"{after['tokens_per_s']:,.0f} tokens/s)")
        est = results.get("estimate", {})
        if est:
            print(f"  dry-run estimate             {gib(est['peak']) if 'peak' in est else est['error']}")
        print("\nratios (one run):")
        print(f"  after / floor                {after['peak'] / floor['floor']:6.2f}x   (goal <= 1.3x)")
        if "before_extrapolated" in results:
            print(f"  before / after               {results['before_extrapolated'] / after['peak']:6.2f}x   "
                  f"(goal >= 8x)")
        if "peak" in est:
            print(f"  estimate / after             {est['peak'] / after['peak']:6.2f}x   (goal 0.85-1.15x)")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
