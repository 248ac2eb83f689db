"""AR-Trust's commit after partial acceptance: keeping per-position states vs replaying the accepted tokens.

Keeping: the verify forward records every clean row's KV, GDN state and conv inputs, and the commit selects the
accepted prefix (no forward). Replaying: the verify forward records nothing, and a causal forward over the
accepted tokens writes the caches. Both leave identical caches (tested in tests/decoding/test_ar_trust.py);
this prints the time of each per round, measured in one run, as a ratio.

    python benchmarks/bench_commit.py [--size tiny|small] [--batch 8] [--gen-block 4] [--rounds 50]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import flare
from flare.model import CommitRecord
from flare.model.context import Rows
from flare.testing.checkpoints import save_tiny_checkpoint

SIZES = {
    "tiny": {},
    "small": dict(hidden_size=256, num_hidden_layers=8, vocab_size=1024, intermediate_size=512,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, linear_num_key_heads=4,
                  linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gen-block", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = flare.load_model(save_tiny_checkpoint(tmp, "qwen3_5", seed=0, tokenizer=False, **SIZES[args.size]))
    V, B, N = model.config.vocab_size, args.batch, args.gen_block
    model.config.mask_token_id = V - 1
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, V - 1, (B, 64), generator=g)
    rounds = [torch.randint(0, V - 1, (B, N), generator=g) for _ in range(args.rounds)]
    accepts = [torch.randint(1, N + 1, (B,), generator=g) for _ in range(args.rounds)]
    masks = torch.full((B, N - 1), V - 1)

    def run(keep: bool) -> list[float]:
        cache = model.new_cache(B, capacity=64 + N * args.rounds + 8)
        model.hidden_states(prefix, cache=cache)
        times = []
        for clean, n in zip(rounds, accepts):
            start = time.perf_counter()
            rows = torch.cat([clean, masks], 1)
            if keep:
                record = CommitRecord.empty()
                model.hidden_states(rows, cache=cache, layout=Rows(N), record=record)
                cache.commit(record, n)
            else:
                model.hidden_states(rows, cache=cache, layout=Rows(N))
                # Replay: a causal forward over the accepted tokens (right-padded per row) writes the caches.
                valid = torch.arange(N)[None] < n[:, None]
                model.hidden_states(clean, cache=cache, valid=valid)
                cache.tighten(int(cache.lengths.max()))
            times.append(time.perf_counter() - start)
        return times

    with torch.no_grad():
        run(True), run(False)  # warm-up
        keep, replay = [], []
        for _ in range(3):
            keep += run(True)
            replay += run(False)
    k, r = statistics.median(keep) * 1e3, statistics.median(replay) * 1e3
    print(f"size {args.size}, batch {B}, gen block {N}, {args.rounds} rounds x 3, torch threads {args.threads}")
    print(f"{'strategy':<34}{'ms/round':>10}")
    print(f"{'keep per-position states':<34}{k:>10.2f}")
    print(f"{'replay accepted tokens':<34}{r:>10.2f}")
    print(f"SUMMARY: keeping states costs {k / r:.2f}x the time of replaying per verify round "
          f"({'keep' if k < r else 'replay'} is faster here)")


if __name__ == "__main__":
    main()
