"""``flare data score | distill | filter``: argument parsing and file handling around flare.transfer."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def add_commands(sub) -> None:
    data = sub.add_parser("data", help="transfer-data tools: score with the seed model, self-distill, filter",
                          description="Transfer-data tools (docs/method.md §5).")
    cmds = data.add_subparsers(dest="data_command", required=True)

    sc = cmds.add_parser("score", help="seed-model NLL / perplexity of each row's assistant tokens",
                         description="Score every row by the seed model's mean NLL of its supervised (assistant) "
                                     "tokens: low = on the seed's distribution.")
    sc.add_argument("--model", required=True, help="the seed checkpoint (with tokenizer.json)")
    sc.add_argument("--data", required=True, help="chat JSONL (the training row format)")
    sc.add_argument("--out", required=True, help="per-row scores JSONL; OUT.summary.json and OUT.png beside it")
    sc.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward (default: 8192)")
    sc.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    sc.set_defaults(func=_score)

    ds = cmds.add_parser("distill", help="the seed model's own answers to prompts, as training rows",
                         description="Self-distilled transfer data through the batched engine. Prompt rows: chat "
                                     "rows (answered after the last user turn), {prompt} or {question}.")
    ds.add_argument("--model", required=True, help="the seed checkpoint (with tokenizer.json)")
    ds.add_argument("--prompts", required=True, help="JSONL of prompt rows (an 'answer' key enables --verify)")
    ds.add_argument("--out", required=True, help="output JSONL of training rows")
    ds.add_argument("--verify", default="none", choices=["none", "strict", "number"],
                    help="keep only verified answers: strict ('Answer: N' / \\boxed{N}) or number (final number)")
    ds.add_argument("--temperature", type=float, default=0.0)
    ds.add_argument("--top-p", type=float, default=1.0)
    ds.add_argument("--top-k", type=int, default=0)
    ds.add_argument("--max-tokens", type=int, default=256)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--limit", type=int, help="only the first N prompt rows")
    ds.add_argument("--max-num-seqs", type=int, default=32, help="prompts decoded at once (default: %(default)s)")
    ds.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ds.set_defaults(func=_distill)

    fl = cmds.add_parser("filter", help="keep rows by seed-NLL and length thresholds, with reasons",
                         description="Keep or drop rows using the scores of `flare data score`.")
    fl.add_argument("--data", required=True, help="the JSONL that was scored")
    fl.add_argument("--scores", required=True, help="the per-row scores JSONL of `flare data score`")
    fl.add_argument("--out", required=True, help="kept rows (JSONL); OUT.dropped.jsonl lists the others")
    fl.add_argument("--max-nll", type=float, help="drop rows whose mean NLL is above this")
    fl.add_argument("--min-nll", type=float, help="drop rows whose mean NLL is below this")
    fl.add_argument("--min-tokens", type=int, help="drop rows with fewer supervised tokens")
    fl.add_argument("--max-tokens", type=int, help="drop rows with more supervised tokens")
    fl.set_defaults(func=_filter)


def _rows(path: str, limit: int | None = None):
    from flare.data.jsonl import read_jsonl

    stats: Counter = Counter()
    rows = list(read_jsonl(path, stats=stats))
    for reason in ("invalid_json", "invalid_utf8", "not_object"):
        if stats[reason]:
            print(f"flare data: {path}: skipped {stats[reason]} lines ({reason}); see the log for line numbers",
                  file=sys.stderr)
    return rows[:limit] if limit else rows


def _write(rows, path: str) -> None:
    from flare.data.jsonl import write_jsonl

    write_jsonl(rows, path)


def _score(args: argparse.Namespace) -> int:
    from flare.checkpoint import load_model
    from flare.data import ChatTokenizer
    from flare.device import pick_device, pick_dtype
    from flare.transfer.score import score_rows, summarize

    model = load_model(args.model, device=pick_device(args.device)).eval()
    model = model.to(pick_dtype(model.device, None, model.dtype, sum(p.numel() for p in model.parameters())))
    records = score_rows(model, ChatTokenizer.from_dir(args.model), _rows(args.data),
                         batch_tokens=args.batch_tokens)
    _write(records, args.out)
    summary = {"model": args.model, "data": args.data, **summarize(records)}
    base = Path(args.out).with_suffix("")
    Path(f"{base}.summary.json").write_text(json.dumps(summary, indent=2))
    try:
        from flare.eval.plots import histogram_plot

        histogram_plot([r["nll"] for r in records if "nll" in r], f"{base}.png", "mean NLL per supervised token",
                       f"seed NLL of {Path(args.data).name}")
    except ModuleNotFoundError as e:
        print(f"flare data score: no plot ({e})", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def _distill(args: argparse.Namespace) -> int:
    from flare.engine import EngineConfig
    from flare.engine.llm import LLM
    from flare.transfer.distill import DistillConfig, distill_rows

    config = DistillConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                           max_tokens=args.max_tokens, seed=args.seed, verify=args.verify)
    llm = LLM.from_dir(args.model, device=args.device, config=EngineConfig(max_num_seqs=args.max_num_seqs))
    rows, counts, bad = distill_rows(llm, _rows(args.prompts, args.limit), config)
    for line, why in bad:
        print(f"flare data distill: {args.prompts} line {line}: {why}", file=sys.stderr)
    _write(rows, args.out)
    print(json.dumps({"out": args.out, **counts, "unusable_prompts": len(bad)}))
    return 0


def _filter(args: argparse.Namespace) -> int:
    from flare.transfer.filter import FilterConfig, filter_rows

    config = FilterConfig(max_nll=args.max_nll, min_nll=args.min_nll, min_tokens=args.min_tokens,
                          max_tokens=args.max_tokens)
    scores = {r["line"]: r for _, r in _rows(args.scores)}
    kept, counts, dropped = filter_rows(_rows(args.data), scores, config)
    _write(kept, args.out)
    _write([{"line": line, "reason": why} for line, why in dropped], str(Path(args.out).with_suffix("")) +
           ".dropped.jsonl")
    print(json.dumps({"out": args.out, **counts}))
    return 0
