"""Stage ``score``: the seed's NLL of every transfer row's answer (``flare data score``'s ``score_rows``).

Self-distilled answers are the seed's own, so their NLL under the seed is low by construction; the summary
(``transfer.scores.json``: token-weighted mean NLL, quartiles, rejections) and the per-row scores
(``transfer.scores.jsonl``) show it, and the evaluation later compares the converted model's NLL of the seed's
answers against this seed's.
"""

from __future__ import annotations

import json

from recipes.smollm2.common import DTYPE, Run, read_json, write_json


def paths(run: Run):
    return run.work / "transfer.scores.jsonl", run.work / "transfer.scores.json"


def done(run: Run) -> bool:
    rows, summary = paths(run)
    made = read_json(run.transfer.with_suffix(".json"))
    found = read_json(summary)
    return made is not None and found is not None and found.get("data") == made and rows.is_file()


def make(run: Run) -> None:
    import torch

    from flare.checkpoint import load_model
    from flare.data import ChatTokenizer
    from flare.data.jsonl import read_jsonl
    from flare.transfer.score import score_rows, summarize

    made = read_json(run.transfer.with_suffix(".json"))
    if made is None:
        raise SystemExit(f"no transfer data at {run.transfer}: run the distill stage first")
    model = load_model(run.seed).to(getattr(torch, DTYPE)).eval()
    records = score_rows(model, ChatTokenizer.from_dir(run.seed), read_jsonl(run.transfer))
    rows, summary = paths(run)
    tmp = rows.with_name(f".{rows.name}.tmp-0")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(rows)
    write_json(summary, {"model": str(run.seed), "data": made, **summarize(records)})
