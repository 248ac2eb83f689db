"""AR-Trust's commit after partial acceptance: keeping per-position states vs replaying the accepted tokens.

Keeping: the verify forward records every clean row's KV, GDN state and conv inputs, and the commit selects the
accepted prefix (no forward). Replaying: the verify forward records nothing, and a causal forward over the
accepted tokens writes the caches. Both leave identical caches (tested in tests/decoding/test_ar_trust.py, and
checked here after the warm-up); this prints the time of each per round, measured in one run, as a ratio.

Like for like: both arms start from a cache whose KV slots are reserved for every round before timing (so neither
regrows inside the timed region, checked after each run), run under ``frozen_weights`` as decoding's runners
do, and end each round as the decoding stepper does, lowering the cache's length bound to the true longest and
shortest lengths (one host read), so attention in the next round spans the same committed keys in both arms.
Each round's inputs (rows, accepted counts and the replay's validity mask) are built before timing.

    python benchmarks/bench_commit.py [--size tiny|small|real] [--batch 8] [--gen-block N] [--rounds 50]
        [--device cuda] [--dtype auto|float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _models import SIZE_HELP, SIZES, add_device_args, random_checkpoint, resolve_checkpoint, sync

import flare
from flare.decoding import ArTrustOptions, check_request
from flare.device import describe
from flare.model import CommitRecord, frozen_weights
from flare.model.cache import AttentionState
from flare.model.context import Rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="tiny", help=SIZE_HELP)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gen-block", type=int, default=None,
                    help="AR-Trust's N (default: as AR-Trust resolves it for this checkpoint's training block)")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    add_device_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        random_checkpoint(tmp, args.size, seed=0)
        device, dtype = resolve_checkpoint(args, tmp)
        model = flare.load_model(tmp, device=device, dtype=dtype)
    model.config.mask_token_id = model.config.vocab_size - 1
    mode = ArTrustOptions(gen_block=args.gen_block)
    V, B, N = model.config.vocab_size, args.batch, check_request(model.config, [[0]], mode).gen_block
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, V - 1, (B, 64), generator=g)
    rounds = [torch.randint(0, V - 1, (B, N), generator=g) for _ in range(args.rounds)]
    accepts = [torch.randint(1, N + 1, (B,), generator=g) for _ in range(args.rounds)]
    masks = torch.full((B, N - 1), V - 1)
    rows_in = [torch.cat([clean, masks], 1) for clean in rounds]  # [clean x N ; MASK x (N - 1)]
    valids = [torch.arange(N)[None] < n[:, None] for n in accepts]  # replay: right padding past each accept
    prefix, rounds, accepts, rows_in, valids = (
        x.to(device) if isinstance(x, torch.Tensor) else [t.to(device) for t in x]
        for x in (prefix, rounds, accepts, rows_in, valids))
    # Room for both arms' every round: the bound never exceeds 64 + N * round, and a round writes at most
    # 2N - 1 rows (the verify forward) or N rows (the replay) after it.
    capacity = 64 + N * (args.rounds + 2)

    def kv_storage(cache) -> list[int]:
        return [layer.k.data_ptr() for layer in cache.layers if isinstance(layer, AttentionState)]

    def run(keep: bool):
        cache = model.new_cache(B, capacity=capacity)
        model.hidden_states(prefix, cache=cache)
        storage = kv_storage(cache)
        times = []
        sync(device)
        for rows, clean, n, valid in zip(rows_in, rounds, accepts, valids):
            start = time.perf_counter()
            if keep:
                record = CommitRecord.empty()
                model.hidden_states(rows, cache=cache, layout=Rows(N), record=record)
                cache.commit(record, n)
            else:
                model.hidden_states(rows, cache=cache, layout=Rows(N))
                # Replay: a causal forward over the accepted tokens (right-padded per row) writes the caches.
                model.hidden_states(clean, cache=cache, valid=valid)
            # Both arms: the stepper's one host read per round, then the bound comes down to the true lengths.
            longest, shortest = torch.stack([cache.lengths.max(), cache.lengths.min()]).tolist()
            cache.tighten(longest, shortest)
            times.append(time.perf_counter() - start)
        if kv_storage(cache) != storage:
            raise RuntimeError("the KV cache regrew inside the timed region: raise the reserved capacity")
        return times, cache

    with torch.no_grad(), frozen_weights():
        (_, kept), (_, replayed) = run(True), run(False)  # warm-up, and a check that both do the same work
        _same_caches(kept, replayed, 1e-4 if dtype == torch.float32 else 5e-2)
        keep, replay = [], []
        for i in range(3):  # alternate which arm runs first
            for arm in ((True, False) if i % 2 == 0 else (False, True)):
                (keep if arm else replay).extend(run(arm)[0])
    k, r = statistics.median(keep) * 1e3, statistics.median(replay) * 1e3
    print(f"size {args.size}, batch {B}, gen block {N}, {args.rounds} rounds x 3, torch threads {args.threads}, "
          f"{describe(device, dtype)}")
    print(f"{'strategy':<34}{'ms/round':>10}")
    print(f"{'keep per-position states':<34}{k:>10.2f}")
    print(f"{'replay accepted tokens':<34}{r:>10.2f}")
    print(f"SUMMARY: keeping states costs {k / r:.2f}x the time of replaying per verify round "
          f"({'keep' if k < r else 'replay'} is faster here)")


def _same_caches(a, b, tol: float = 1e-4) -> None:
    """Both arms committed the same tokens: equal lengths, equal KV up to each length, equal recurrent states."""
    if not torch.equal(a.lengths, b.lengths):
        raise RuntimeError("the two arms committed different lengths")
    for x, y in zip(a.layers, b.layers):
        if isinstance(x, AttentionState):
            pairs = [(x.k[i, :n], y.k[i, :n]) for i, n in enumerate(a.lengths.tolist())]
            pairs += [(x.v[i, :n], y.v[i, :n]) for i, n in enumerate(a.lengths.tolist())]
        else:
            pairs = [(x.conv, y.conv), (x.ssm, y.ssm)]
        if any((p - q).abs().max() > tol for p, q in pairs):
            raise RuntimeError("the two arms left different caches")


if __name__ == "__main__":
    main()
