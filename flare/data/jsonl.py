"""Streaming JSONL: one object per line, malformed lines reported by file and line number.

``on_error="raise"`` stops at the first malformed line with a ``ValueError`` naming ``file:line``;
``on_error="skip"`` counts it (under its reason) in a ``Counter`` and logs a warning with the line number.
Blank lines are ignored. ``.gz`` files are read transparently.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger("flare.data")

ON_ERROR = ("skip", "raise")
# Enough lines to diagnose a bad file without flooding the log of a million-row one.
MAX_LOGGED = 20


class ErrorPolicy:
    """What to do with a malformed row of one file: raise, or count under a reason and log (the first few)."""

    def __init__(self, path: str | Path, on_error: str = "skip", stats: Counter | None = None) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.path = Path(path)
        self.on_error = on_error
        self.stats = stats if stats is not None else Counter()
        self.logged = 0

    def malformed(self, line: int, reason: str, detail: str) -> None:
        """A row that breaks the format or schema: raise (``raise`` mode) or count and warn."""
        if self.on_error == "raise":
            raise ValueError(f"{self.path}:{line}: {reason}: {detail}")
        self.stats[reason] += 1
        if self.logged < MAX_LOGGED:
            log.warning("%s:%d: skipped (%s): %s", self.path, line, reason, detail)
        elif self.logged == MAX_LOGGED:
            log.warning("%s: further malformed rows are counted, not logged", self.path)
        self.logged += 1


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_jsonl(path: str | Path, *, on_error: str = "skip", stats: Counter | None = None,
               policy: ErrorPolicy | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """An iterator of ``(line_number, object)`` for every line holding a JSON object (line numbers start at 1).

    Reasons counted in ``stats`` under ``skip``: ``invalid_utf8``, ``invalid_json``, ``not_object``; ``lines``
    counts the non-blank lines read.
    """
    path = Path(path)
    # Checked here, not at the first next(): a wrong path fails where it is given.
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    return _rows(path, policy or ErrorPolicy(path, on_error, stats))


def _rows(path: Path, policy: ErrorPolicy) -> Iterator[tuple[int, dict[str, Any]]]:
    with _open(path) as f:
        for line_number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            policy.stats["lines"] += 1
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                policy.malformed(line_number, "invalid_utf8", str(e))
                continue
            except json.JSONDecodeError as e:
                policy.malformed(line_number, "invalid_json", str(e))
                continue
            if not isinstance(obj, dict):
                policy.malformed(line_number, "not_object", f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield line_number, obj


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write one JSON object per line (UTF-8, parent folders created); returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
