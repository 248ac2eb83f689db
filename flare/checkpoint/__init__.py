"""Load and save FlareModel as a Hugging Face checkpoint directory (config.json + safetensors)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from flare.checkpoint.io import parameter_count, read_tensors, stored_dtype, write_tensors
from flare.checkpoint.keymaps import expected_hf_shapes, flare_to_hf, hf_to_flare, ignored
from flare.config import ModelConfig
from flare.model import FlareModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match its config exactly."""


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> FlareModel:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    config = ModelConfig.from_file(path)
    tensors = {k: v for k, v in read_tensors(path).items() if not ignored(k)}
    with torch.device("meta"):
        model = FlareModel(config)
    # Everything is checked under the names the file uses, so errors point at what the user can see.
    expected = expected_hf_shapes(model.state_dict(), config)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    for key, shape in expected.items():
        if key not in tensors:
            raise CheckpointError(f"{path}: missing tensor {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the config needs {shape}"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(
            f"{path}: tensor {extra[0]!r} belongs to no layer of this {config.family} config"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    state = hf_to_flare(tensors, config)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device).eval()


def save_model(
    model: FlareModel,
    path: str | Path,
    *,
    tokenizer_from: str | Path | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write config.json and safetensors (HF layout of the model's family); copy tokenizer files if asked.

    ``state`` replaces ``model.state_dict()`` (a full state dict gathered from a sharded model)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tensors(flare_to_hf(state if state is not None else model.state_dict(), model.config), path)
    model.config.save(path)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_from) / name
            if src.exists() and src.resolve() != (path / name).resolve():
                shutil.copy2(src, path / name)


__all__ = ["CheckpointError", "load_model", "save_model", "parameter_count", "read_tensors", "stored_dtype",
           "write_tensors"]
