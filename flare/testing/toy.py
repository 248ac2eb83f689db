"""The toy AR checkpoint and data that tests, examples and the demo train on: nothing downloaded, all seeded.

- ``toy_ar_checkpoint(path)``: a character-level ChatML tokenizer (``save_char_tokenizer``) plus a tiny seeded
  Qwen3.5-style hybrid (Gated DeltaNet + attention, ``flare.testing.checkpoints.hf_model``) sized to it;
  a plain AR checkpoint, ready for ``flare convert``.
- ``toy_data(path, count)``: arithmetic chats (``flare.data.arithmetic.generate_rows``) as JSONL.
- ``toy_flare_checkpoint(path)``: the converted (FLARE) checkpoint of ``toy_ar_checkpoint``.
- ``toy_train_config(...)``: a small, fast training config dict for them (YAML/JSON-ready).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flare.testing.checkpoints import hf_model


def toy_ar_checkpoint(path: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Write a char tokenizer and a tiny seeded hybrid AR model (vocabulary = the tokenizer's) to ``path``."""
    from flare.data import save_char_tokenizer

    path = Path(path)
    tok = save_char_tokenizer(path)
    overrides.setdefault("vocab_size", tok.vocab_size)
    hf_model("qwen3_5", seed=seed, **overrides).save_pretrained(path)
    return path


def toy_flare_checkpoint(path: str | Path, *, ar_dir: str | Path | None = None, seed: int = 0,
                         **overrides: Any) -> Path:
    """The FLARE checkpoint of ``toy_ar_checkpoint`` at ``path`` (the AR one at ``ar_dir``, default ``path-ar``)."""
    from flare.train.convert import convert

    path = Path(path)
    ar_dir = Path(ar_dir) if ar_dir is not None else path.with_name(path.name + "-ar")
    if not (ar_dir / "config.json").exists():
        toy_ar_checkpoint(ar_dir, seed=seed, **overrides)
    convert(ar_dir, path)
    return path


def toy_data(path: str | Path, count: int = 200, *, seed: int = 0, **kwargs: Any) -> Path:
    """``count`` arithmetic chat rows (``flare.data.arithmetic.generate_rows``) written as JSONL to ``path``."""
    from flare.data.jsonl import write_jsonl
    from flare.data.arithmetic import generate_rows

    path = Path(path)
    write_jsonl(generate_rows(count, seed=seed, **kwargs), path)
    return path


def toy_train_config(model: str | Path, data_path: str | Path | list[str | Path], out_dir: str | Path,
                     **overrides: Any) -> dict[str, Any]:
    """A TrainConfig dict for the toy model: seq_len 96, batch 4, a few steps; ``overrides`` replace top-level
    keys (give whole sections, e.g. ``optim={...}``)."""
    paths = data_path if isinstance(data_path, list) else [data_path]
    cfg: dict[str, Any] = {
        "model": str(model),
        "out_dir": str(out_dir),
        "data": {"train": [{"path": str(p)} for p in paths], "seq_len": 96},
        "steps": 6,
        "batch_size": 4,
        "save_every": 3,
        "seed": 0,
        "progress": False,
        "device": "cpu",
        "optim": {"lr": 0.003, "warmup_steps": 2},
    }
    cfg.update(overrides)
    return cfg
