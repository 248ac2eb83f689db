"""One FLARE training step with the idle noisy blocks dropped (the default) against the full two-stream layout.

A noisy block in which nothing is masked is seen by no scored row (``flare.model.noisy_blocks``): dropping it
changes no loss and no gradient (tests/model/test_noisy_blocks.py), only the rows the forward runs. On
supervised data, where the prompt fills most blocks, that is most of the noisy stream.

What it measures, in one run: the rows per forward of both layouts and the time of one training step
(``loss.backward()`` included, optimizer excluded; the trainer's dtype: bf16 autocast where the CPU multiplies
bf16 natively, fp32 elsewhere), after one warm-up step each, ``--repeats`` interleaved rounds (dropped, full,
dropped, ...) on the same batches; medians and the ratio dropped / full.

Data: ``--data`` (a chat JSONL, as ``flare train`` reads) packed with the checkpoint's tokenizer, or by default
a seeded synthetic batch of prompt-heavy documents (prompt 80%, response 20%: what the SmolLM2 recipe's transfer
data looks like). Model: ``--model`` (a converted checkpoint), or by default the seeded small Qwen3.5 hybrid of
bench_objective.py.

Run:  .venv/bin/python benchmarks/bench_idle_blocks.py [--model DIR --data FILE.jsonl] [--batch 4]
          [--seq-len 256] [--block-size 4] [--repeats 3] [--threads 2]
Example (the SmolLM2 recipe's training step): --model runs/smollm2-v3/converted --data runs/smollm2-v3/transfer.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

import flare
from flare.data.batch import PackedBatch
from flare.device import describe, native_bf16
from flare.objective import FlareObjective, ObjectiveConfig


def synthetic(batch: int, seq_len: int, block: int, vocab: int, seed: int) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    rows, lm, docs = [], [], []
    for _ in range(batch):
        ids, mask, dd, d = [], [], [], 0
        while True:
            n = int(torch.randint(48, 96, (1,), generator=g))
            n += -n % block
            if len(ids) + n > seq_len:
                break
            prompt = int(n * 0.8)
            ids += torch.randint(0, vocab - 1, (n,), generator=g).tolist()
            mask += [False] * prompt + [True] * (n - prompt)
            dd += [d] * n
            d += 1
        tail = seq_len - len(ids)
        rows.append(ids + [0] * tail), lm.append(mask + [False] * tail), docs.append(dd + [d] * tail)
    return PackedBatch(torch.tensor(rows), torch.tensor(lm), torch.tensor(docs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a converted checkpoint (default: a seeded small Qwen3.5 hybrid)")
    ap.add_argument("--data", help="chat JSONL to pack (default: synthetic prompt-heavy documents)")
    ap.add_argument("--batch", type=int, default=4, help="packed rows per step")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per packed row")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds after one warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.model:
        model = flare.load_model(a.model).float().train()
    else:
        from bench_objective import MODEL
        from flare.testing.checkpoints import save_tiny_checkpoint


        d = save_tiny_checkpoint(tempfile.mkdtemp(prefix="idle-blocks-"), "qwen3_5", seed=a.seed, **MODEL)
        model = flare.load_model(d).float().train()
        model.config.mask_token_id = model.config.vocab_size - 1
    mask_id = model.config.mask_token_id
    if mask_id is None:
        raise SystemExit(f"{a.model} has no [MASK] token: run `flare convert` on it first")
    if a.data:
        from flare.data.dataset import PackedDataset
        from flare.data.tokenizers import ChatTokenizer

        ds = PackedDataset.from_jsonl(a.data, ChatTokenizer.from_dir(a.model), seq_len=a.seq_len,
                                      block_size=a.block_size)
        batches = [ds[list(range(i, i + a.batch))] for i in range(0, min(len(ds), a.batch * 4) - a.batch + 1,
                                                                     a.batch)]
        if not batches:
            raise SystemExit(f"{a.data} packs into {len(ds)} rows, fewer than --batch {a.batch}")
    else:
        batches = [synthetic(a.batch, a.seq_len, a.block_size, model.config.vocab_size, a.seed + i)
                   for i in range(4)]
    bf16 = native_bf16(torch.device("cpu"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    dtype = torch.bfloat16 if bf16 else torch.float32
    print(f"# {describe(torch.device('cpu'), dtype)} (bf16 autocast, fp32 weights, where native); {a.threads} threads; "
          f"batch {a.batch} x {a.seq_len}, block {a.block_size}")
    objectives = {}
    for name, drop in (("dropped", True), ("full", False)):
        objectives[name] = FlareObjective(ObjectiveConfig(block_size=a.block_size), mask_id)
        objectives[name].drop_idle_blocks = drop
    views = [objectives["full"].views(b, torch.Generator().manual_seed(a.seed + i)) for i, b in enumerate(batches)]
    rows = {n: statistics.mean(o.prepare(model, b, v).input_ids.shape[1] for b, v in zip(batches, views))
            for n, o in objectives.items()}

    def step(name: str, i: int) -> float:
        b, v = batches[i % len(batches)], views[i % len(views)]
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        with autocast:
            loss, _ = objectives[name].loss_from_views(model, b, v)
        loss.backward()
        return time.perf_counter() - t

    times = {n: [] for n in objectives}
    for n in objectives:
        step(n, 0)
    for r in range(a.repeats):
        for n in objectives:
            times[n].append(step(n, r))
            print(f"round {r + 1} {n}: {times[n][-1]:.2f} s", file=sys.stderr, flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    print("| layout | rows per forward (mean) | step time (median) |")
    print("|---|---|---|")
    for n in objectives:
        print(f"| {n} | {rows[n]:.0f} | {med[n]:.2f} s |")
    print(f"dropped / full: rows {rows['dropped'] / rows['full']:.2f}x, step time {med['dropped'] / med['full']:.2f}x")


if __name__ == "__main__":
    main()
