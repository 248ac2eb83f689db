"""AR-Trust's commit after partial acceptance: four ways, each a verify forward plus its commit per round.

Stacked (what decoding does for states of ``KEEP_MIN_STATE_BYTES`` or more): the verify forward records every
clean row's KV, GDN deltas and conv inputs, and the commit selects the accepted prefix with no forward; the
recurrent states are not written but keep the commit as a low-rank update that the next verify forward reads
(``flare.ops.gated_delta.pending``), written every 16 kept rows, all layers' updates in one stack
(``pending_stack``: a commit is a few ops, not a few per layer). Kept: the same, layer by layer. Written: every
commit writes the states at once (one pass over them per round; what decoding does for smaller states).
Replaying: the verify forward records nothing, and a causal forward over the accepted tokens writes the caches.
All leave identical caches (tested in tests/decoding/test_ar_trust.py and tests/engine/
test_runner.py, and checked here after the warm-up); this prints the time of each per round and of its commit alone,
measured in one run, as ratios.

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
from flare.device import describe, prepare_process
from flare.model import CommitRecord, frozen_weights
from flare.model.cache import AttentionState, RecurrentState
from flare.model.context import Rows
from flare.ops.gated_delta.pending import PENDING_ROWS, PendingCommits
from flare.ops.gated_delta.pending_stack import PendingStack

ARMS = ("stacked", "kept", "written", "replay")


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
    prepare_process()  # first, before torch starts its intra-op threads (flare.device)
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

    def run(arm: str):
        keep = arm != "replay"
        cache = model.new_cache(B, capacity=capacity)
        recurrent = [layer for layer in cache.layers if isinstance(layer, RecurrentState)]
        for layer in recurrent:  # written: no room for kept rows, every commit writes the states
            if keep:
                layer.pending = PendingCommits.empty(layer.ssm, rows=PENDING_ROWS if arm == "kept" else 0)
        if arm == "stacked":
            cache.stack = PendingStack.empty([layer.ssm for layer in recurrent], rows=PENDING_ROWS)
            for layer, view in zip(recurrent, cache.stack.views):
                layer.pending = view
        model.hidden_states(prefix, cache=cache)
        storage = kv_storage(cache)
        times, commits = [], []
        sync(device)
        for rows, clean, n, valid in zip(rows_in, rounds, accepts, valids):
            start = time.perf_counter()
            if keep:
                record = CommitRecord.empty()
                model.hidden_states(rows, cache=cache, layout=Rows(N), record=record)
                record.rows = N  # only the clean rows can be accepted (the runner's ``clean_rows``)
                sync(device)
                begin = time.perf_counter()
                cache.commit(record, n)
                sync(device)
                commits.append(time.perf_counter() - begin)
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
        return times, commits, cache

    with torch.no_grad(), frozen_weights():
        caches = [run(arm)[2] for arm in ARMS]  # warm-up, and a check that all do the same work
        for arm, other in zip(ARMS[1:], caches[1:]):
            # (bf16: a replay's GEMMs round otherwise than a verify forward's, which random weights amplify over
            # the rounds; the exact equality is tested in fp32 and fp64)
            _same_caches(caches[0], other, 1e-4 if dtype == torch.float32 else 0.1)
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        commits: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for i in range(len(ARMS)):  # rotate which arm runs first
            for arm in ARMS[i:] + ARMS[:i]:
                round_times, commit_times, _ = run(arm)
                times[arm] += round_times
                commits[arm] += commit_times
    # Means: a kept arm's rounds that write the states are a few among many (a median would hide them).
    ms = {arm: statistics.fmean(t) * 1e3 for arm, t in times.items()}
    commit_ms = {arm: statistics.fmean(t) * 1e3 if t else None for arm, t in commits.items()}
    print(f"size {args.size}, batch {B}, gen block {N}, {args.rounds} rounds x {len(ARMS)}, torch threads "
          f"{args.threads}, {describe(device, dtype)}")
    print(f"{'strategy (verify forward + commit)':<44}{'ms/round':>10}{'x stacked':>10}{'commit ms':>11}")
    # Which of the first three decoding runs for this model's states (flare.ops.gated_delta.pending).
    default = model.new_cache(1).stack is not None
    names = {"stacked": "kept, all layers at once" + (" (decoding's)" if default else ""),
             "kept": "kept as an update, layer by layer",
             "written": "states written every round" + ("" if default else " (decoding's)"),
             "replay": "replay accepted tokens"}
    for arm in ARMS:
        commit = f"{commit_ms[arm]:>11.2f}" if commit_ms[arm] is not None else f"{'-':>11}"
        print(f"{names[arm]:<44}{ms[arm]:>10.2f}{ms[arm] / ms['stacked']:>9.2f}x{commit}")
    print(f"SUMMARY: a round with the commits kept all layers at once costs {ms['stacked'] / ms['kept']:.2f}x one "
          f"that keeps them layer by layer (its commit {commit_ms['stacked'] / commit_ms['kept']:.2f}x), "
          f"{ms['stacked'] / ms['written']:.2f}x one that writes the states and "
          f"{ms['stacked'] / ms['replay']:.2f}x one that replays the accepted tokens")


def _same_caches(a, b, tol: float = 1e-4) -> None:
    """Both arms committed the same tokens: equal lengths, equal KV up to each length, equal recurrent states
    (with the commits they keep applied), to ``tol`` of each tensor's largest value (at least 1)."""
    if not torch.equal(a.lengths, b.lengths):
        raise RuntimeError("the two arms committed different lengths")
    for x, y in zip(a.layers, b.layers):
        if isinstance(x, AttentionState):
            pairs = [(x.k[i, :, :n], y.k[i, :, :n]) for i, n in enumerate(a.lengths.tolist())]
            pairs += [(x.v[i, :, :n], y.v[i, :, :n]) for i, n in enumerate(a.lengths.tolist())]
        else:
            pairs = [(x.conv, y.conv), (x.pending.state(x.ssm), y.pending.state(y.ssm))]
        # Relative to the values' size: in bf16 a replay's GEMMs round differently from a verify forward's.
        worst = max(float((p.float() - q.float()).abs().max() / q.float().abs().max().clamp(min=1)) for p, q in pairs)
        if worst > tol:
            raise RuntimeError(f"the arms left different caches (relative difference {worst:.3g} > {tol:g})")


if __name__ == "__main__":
    main()
