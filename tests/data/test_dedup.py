"""Exact dedup: by sha256 of whitespace- and NFC-normalised messages; case-sensitive; counted."""

from __future__ import annotations

from collections import Counter

from flare.data import Deduplicator, load_chat_jsonl, parse_row, write_jsonl


def _conv(user: str, answer: str = "a", reasoning: str | None = None):
    return parse_row({"messages": [{"role": "user", "content": user},
                                   {"role": "assistant", "content": answer, "reasoning_content": reasoning}]})


def test_whitespace_and_nfc_variants_are_duplicates():
    dd = Deduplicator()
    assert not dd.is_duplicate(_conv("Caf\u00e9  au\n lait"))
    assert dd.is_duplicate(_conv("  Cafe\u0301 au lait\t"))  # NFC: e + combining acute == é
    assert dd.stats["duplicate"] == 1


def test_case_roles_and_reasoning_still_distinguish():
    dd = Deduplicator()
    assert not dd.is_duplicate(_conv("Hello world"))
    assert not dd.is_duplicate(_conv("hello world"))  # case is kept
    assert not dd.is_duplicate(_conv("Hello world", reasoning="think"))  # reasoning is part of the key
    assert not dd.is_duplicate(_conv("Hello world", answer="b"))
    swapped = parse_row({"messages": [{"role": "system", "content": "Hello world"},
                                      {"role": "assistant", "content": "a"}]})
    assert not dd.is_duplicate(swapped)  # same texts under another role
    assert dd.stats["duplicate"] == 0 and len(dd.seen) == 5


def test_file_dedup_counts_and_keeps_first(tmp_path):
    rows = [{"prompt": "q1", "response": "a"}, {"prompt": " q1 ", "response": "a"},
            {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}]},
            {"prompt": "q2", "response": "a"}]
    write_jsonl(rows, tmp_path / "d.jsonl")
    stats = Counter()
    kept = list(load_chat_jsonl(tmp_path / "d.jsonl", dedup=True, stats=stats))
    assert [c.origin.rsplit(":", 1)[1] for c in kept] == ["1", "4"]
    assert stats["duplicate"] == 2
    # One deduplicator shared across files deduplicates across them.
    shared = Deduplicator()
    write_jsonl(rows[:1], tmp_path / "e.jsonl")
    assert len(list(load_chat_jsonl(tmp_path / "d.jsonl", dedup=shared))) == 2
    assert len(list(load_chat_jsonl(tmp_path / "e.jsonl", dedup=shared))) == 0
