"""Data problems met through the trainer: a missing file, a malformed JSONL row (reported by line; skipped and
counted, or raised), duplicate source names."""

from __future__ import annotations

import logging
import shutil

import pytest

from flare.cli import main
from flare.train.config import TrainConfig, from_dict
from flare.train.loop import Trainer
from tests.train._util import write_config


def _config(make_config, **overrides) -> TrainConfig:
    return from_dict(TrainConfig, make_config(**overrides))


def _broken_copy(toy, tmp_path, line: int = 3):
    """The toy data with line ``line`` replaced by text that is not JSON."""
    lines = toy.data.read_text().splitlines()
    lines[line - 1] = '{"messages": [{"role": "user", "content": "What is 1+1?"'  # cut short
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, len(lines)


def test_missing_data_file_is_named(make_config, toy, tmp_path, capsys):
    missing = tmp_path / "no" / "such.jsonl"
    raw = make_config(data={"train": [{"path": str(missing)}], "seq_len": 96})
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Trainer(from_dict(TrainConfig, raw))
    assert main(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    assert str(missing) in capsys.readouterr().err
    # An eval file too.
    raw = make_config(data={"train": [{"path": str(toy.data)}], "eval": str(tmp_path / "eval.jsonl"), "seq_len": 96})
    with pytest.raises(FileNotFoundError, match="eval.jsonl"):
        Trainer(from_dict(TrainConfig, raw))


def test_malformed_row_raises_with_file_and_line(make_config, toy, tmp_path):
    broken, _ = _broken_copy(toy, tmp_path, line=3)
    cfg = _config(make_config, data={"train": [{"path": str(broken)}], "seq_len": 96, "on_error": "raise"})
    with pytest.raises(ValueError, match=f"{broken}:3: invalid_json"):
        Trainer(cfg)


def test_malformed_row_skipped_counted_and_reported(make_config, toy, tmp_path, capsys, caplog):
    broken, n_lines = _broken_copy(toy, tmp_path, line=3)
    cfg = _config(make_config, data={"train": [{"path": str(broken)}], "seq_len": 96, "on_error": "skip"},
                  steps=2, save_every=100)
    with caplog.at_level(logging.WARNING, logger="flare.data"):
        trainer = Trainer(cfg)
    # The skipped row is logged with its line ...
    assert any(f"{broken}:3" in r.getMessage() and "invalid_json" in r.getMessage() for r in caplog.records)
    # ... counted in the trainer's data stats ...
    stats = trainer.data_stats["broken"]
    assert stats["invalid_json"] == 1
    assert stats["lines"] == n_lines and stats["documents"] == n_lines - 1
    # ... and summed up once at start, one line per source.
    err = capsys.readouterr().err
    summary = [line for line in err.splitlines() if line.startswith("data broken:")]
    assert summary == [f"data broken: {n_lines} lines, {n_lines - 1} documents, {stats['rows']} rows "
                       f"({stats['supervised_tokens']} supervised tokens), 1 rejected (invalid_json 1)"]
    # The run goes on.
    history = trainer.run()
    assert [m["step"] for m in history] == [1, 2]


def test_data_summary_on_the_command_line(make_config, toy, tmp_path, capsys):
    broken, n_lines = _broken_copy(toy, tmp_path, line=5)
    clean = tmp_path / "clean.jsonl"
    shutil.copy(toy.data, clean)
    raw = make_config(data={"train": [{"path": str(broken)}, {"path": str(clean), "name": "ok"}], "seq_len": 96},
                      steps=1, save_every=100)
    assert main(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))]) == 0
    err = capsys.readouterr().err
    assert f"data broken: {n_lines} lines, {n_lines - 1} documents" in err and "1 rejected (invalid_json 1)" in err
    assert f"data ok: {n_lines} lines, {n_lines} documents" in err and "0 rejected" in err


def test_sources_with_the_same_name_are_an_error(make_config, toy, tmp_path):
    other = tmp_path / "other" / toy.data.name
    other.parent.mkdir()
    shutil.copy(toy.data, other)
    cfg = _config(make_config, data={"train": [{"path": str(toy.data)}, {"path": str(other)}], "seq_len": 96})
    with pytest.raises(ValueError, match="named 'train'"):
        Trainer(cfg)
    # Distinct names make it valid, and both sources are sampled.
    cfg = _config(make_config, data={"train": [{"path": str(toy.data)}, {"path": str(other), "name": "b"}],
                                     "seq_len": 96}, steps=1)
    assert set(Trainer(cfg).sampler.sources) == {"train", "b"}
