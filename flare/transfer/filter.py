"""Keep or drop transfer rows by seed-model score and length, saying why each dropped row went."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


@dataclass
class FilterConfig:
    max_nll: float | None = None  # drop rows the seed finds less likely than this (mean NLL per token)
    min_nll: float | None = None  # drop near-duplicates of what the seed already says verbatim, if wanted
    min_tokens: int | None = None  # supervised tokens
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_nll is not None and self.min_nll is not None and self.min_nll > self.max_nll:
            raise ValueError(f"min_nll {self.min_nll} > max_nll {self.max_nll}: nothing could pass")
        if self.min_tokens is not None and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} > max_tokens {self.max_tokens}: nothing could pass")


def _why(score: dict[str, Any] | None, c: FilterConfig) -> str | None:
    if score is None:
        return "no_score"
    if "rejected" in score:
        return f"rejected:{score['rejected']}"
    if c.max_nll is not None and score["nll"] > c.max_nll:
        return "nll_above_max"
    if c.min_nll is not None and score["nll"] < c.min_nll:
        return "nll_below_min"
    if c.min_tokens is not None and score["tokens"] < c.min_tokens:
        return "too_short"
    if c.max_tokens is not None and score["tokens"] > c.max_tokens:
        return "too_long"
    return None


def filter_rows(rows: Iterable[tuple[int, Any]], scores: dict[int, dict[str, Any]], config: FilterConfig
                ) -> tuple[list[Any], dict[str, int], list[tuple[int, str]]]:
    """``rows``: (line, row); ``scores``: line -> a ``score_rows`` record. Returns (kept rows, counts by
    outcome, (line, reason) of every dropped row)."""
    kept, dropped, counts = [], [], {"kept": 0}
    for line, row in rows:
        why = _why(scores.get(line), config)
        if why is None:
            kept.append(row)
            counts["kept"] += 1
        else:
            dropped.append((line, why))
            counts[why] = counts.get(why, 0) + 1
    return kept, counts, dropped
