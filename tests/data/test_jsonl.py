"""JSONL reading: malformed rows reported with their line number; skip counts and continues, raise stops."""

from __future__ import annotations

import gzip
import logging
from collections import Counter

import pytest

from flare.data import load_chat_jsonl, read_jsonl

GOOD = '{"prompt": "q", "response": "a"}'


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_skip_mode_counts_and_warns_with_line_numbers(tmp_path, caplog):
    path = _write(tmp_path / "d.jsonl", [GOOD, "", '{"prompt": "q", ', "[1, 2]", GOOD, '{"text": 1}'])
    stats = Counter()
    with caplog.at_level(logging.WARNING, logger="flare.data"):
        convs = list(load_chat_jsonl(path, on_error="skip", stats=stats))
    assert [c.origin for c in convs] == [f"{path}:1", f"{path}:5"]  # the blank line still counts as a line
    assert (stats["invalid_json"], stats["not_object"], stats["schema"], stats["lines"]) == (1, 1, 1, 5)
    logged = caplog.text
    assert f"{path}:3: skipped (invalid_json)" in logged
    assert f"{path}:4: skipped (not_object)" in logged and f"{path}:6: skipped (schema)" in logged


@pytest.mark.parametrize("bad,reason", [('{"prompt": ', "invalid_json"), ('"just a string"', "not_object"),
                                        ('{"messages": 3}', "schema")])
def test_raise_mode_names_file_and_line(tmp_path, bad, reason):
    path = _write(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD])
    seen = []
    with pytest.raises(ValueError, match=f"d.jsonl:3: {reason}"):
        for conv in load_chat_jsonl(path, on_error="raise"):
            seen.append(conv)
    assert len(seen) == 2


def test_policy_rejections_never_raise(tmp_path):
    """Well-formed rows the data policy refuses are counted even under on_error='raise'."""
    path = _write(tmp_path / "d.jsonl", [GOOD, '{"prompt": "q", "response": "<think>x"}'])
    stats = Counter()
    assert len(list(load_chat_jsonl(path, on_error="raise", stats=stats))) == 1
    assert stats["unclosed_think"] == 1


def test_invalid_utf8_is_reported(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff"}\n')
    stats = Counter()
    assert len(list(read_jsonl(path, stats=stats))) == 1 and stats["invalid_utf8"] == 1
    with pytest.raises(ValueError, match="d.jsonl:2: invalid_utf8"):
        list(read_jsonl(path, on_error="raise"))


def test_missing_file_and_bad_option(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(missing)  # raised at the call, not at the first next()
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_chat_jsonl(missing)
    with pytest.raises(ValueError, match="on_error"):
        read_jsonl(_write(tmp_path / "d.jsonl", [GOOD]), on_error="ignore")


def test_gzip_files_are_read(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(GOOD + "\n" + GOOD + "\n")
    assert [line for line, _ in read_jsonl(path)] == [1, 2]
