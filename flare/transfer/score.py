"""Seed-model NLL of transfer data: how likely the seed finds each row's assistant tokens.

Each row is rendered exactly as training renders it (chat template, label mask on assistant content), run
through the model in length-sorted batches, and scored by the mean negative log-likelihood of its supervised
tokens (perplexity = exp of it). Rows that training would reject are reported with their reason, not scored.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from flare.data import ChatTokenizer, RowRejected, parse_row, render
from flare.model import FlareModel


@torch.no_grad()
def score_rows(model: FlareModel, tokenizer: ChatTokenizer, rows: Iterable[tuple[int, Any]], *,
               batch_tokens: int = 8192, progress: bool = True) -> list[dict[str, Any]]:
    """``rows``: (line number, parsed JSON) pairs. Returns one record per row, in input order:
    ``{"line", "tokens", "nll", "ppl"}`` or ``{"line", "rejected": reason}``."""
    from tqdm.auto import tqdm

    out: dict[int, dict[str, Any]] = {}
    docs = []
    order = []
    for line, row in rows:
        order.append(line)
        try:
            doc = render(parse_row(row, origin=f"line {line}"), tokenizer)
        except RowRejected as e:
            out[line] = {"line": line, "rejected": e.reason}
            continue
        docs.append((line, doc))
    docs.sort(key=lambda d: len(d[1].input_ids))
    bar = tqdm(total=len(docs), desc="score", disable=not progress, leave=False)
    i = 0
    while i < len(docs):
        longest = len(docs[i][1].input_ids)
        j = i
        while j < len(docs) and (j - i + 1) * len(docs[j][1].input_ids) <= max(batch_tokens, longest):
            j += 1
        batch = docs[i:j]
        T = max(len(d.input_ids) for _, d in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)  # host: filled from host lists, then one copy
        mask = torch.zeros(len(batch), T, dtype=torch.bool)  # host: as ids
        for b, (_, d) in enumerate(batch):
            ids[b, : len(d.input_ids)] = torch.tensor(d.input_ids)  # host: as ids
            mask[b, : len(d.loss_mask)] = torch.tensor(d.loss_mask)  # host: as ids
        ids, mask = ids.to(model.device), mask.to(model.device)
        # Right padding after each row never reaches its own positions (causal), so one forward scores all.
        logits = model(ids)[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
        target = mask[:, 1:]
        sums, counts = (nll * target).sum(1).tolist(), target.sum(1).tolist()
        for (line, _), s, c in zip(batch, sums, counts):
            if c == 0:
                out[line] = {"line": line, "rejected": "no_labels"}
            else:
                out[line] = {"line": line, "tokens": int(c), "nll": s / c, "ppl": math.exp(min(s / c, 50.0))}
        bar.update(len(batch))
        i = j
    bar.close()
    return [out[line] for line in order]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Token-weighted mean NLL (and its perplexity), per-row median and quartiles, rejection counts."""
    scored = [r for r in records if "nll" in r]
    rejected: dict[str, int] = {}
    for r in records:
        if "rejected" in r:
            rejected[r["rejected"]] = rejected.get(r["rejected"], 0) + 1
    if not scored:
        return {"rows": len(records), "scored": 0, "rejected": rejected}
    tokens = sum(r["tokens"] for r in scored)
    mean = sum(r["nll"] * r["tokens"] for r in scored) / tokens
    nlls = sorted(r["nll"] for r in scored)
    q = statistics.quantiles(nlls, n=4) if len(nlls) > 1 else [nlls[0]] * 3
    return {"rows": len(records), "scored": len(scored), "tokens": tokens, "mean_nll": mean,
            "ppl": math.exp(mean), "median_nll": statistics.median(nlls), "q1_nll": q[0], "q3_nll": q[2],
            "rejected": rejected}
