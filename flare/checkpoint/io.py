"""Reading and writing safetensors checkpoints (single file or sharded with an index). Never pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def read_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in _files(directory):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def stored_dtype(directory: str | Path) -> torch.dtype:
    """The floating dtype most of a checkpoint's parameters are stored in, read from the file headers only."""
    counts: dict[torch.dtype, int] = {}
    for dtype, n in _header(directory):
        if dtype is not None:
            counts[dtype] = counts.get(dtype, 0) + n
    if not counts:
        raise ValueError(f"{directory} holds no floating-point tensors")
    return max(counts, key=counts.get)


def parameter_count(directory: str | Path) -> int:
    """How many numbers a checkpoint's tensors hold, read from the file headers only."""
    return sum(n for _, n in _header(directory))


def _header(directory: str | Path) -> list[tuple[torch.dtype | None, int]]:
    """(floating dtype or None, element count) of every tensor in a checkpoint, from its safetensors headers."""
    out = []
    for path in _files(directory):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                out.append((_DTYPES.get(sl.get_dtype()), n))
    return out


def _files(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if (directory / INDEX).exists():
        index = json.loads((directory / INDEX).read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (directory / SINGLE).exists():
        files = [SINGLE]
    else:
        found = sorted(p.name for p in directory.glob("*"))
        if any(name.endswith((".bin", ".pt", ".pth")) for name in found):
            raise FileNotFoundError(
                f"{directory} holds only pickled weights; flare loads safetensors only (convert them first)"
            )
        raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {directory}")
    return [directory / name for name in files]


def write_tensors(tensors: dict[str, torch.Tensor], directory: str | Path, max_shard_bytes: int = 4 << 30) -> None:
    """Write shards through temporary names and rename them into place, so a crash leaves no half file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    names = [SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for name, shard in zip(names, shards):
        tmp = directory / f".{name}.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / name)
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    else:
        (directory / INDEX).unlink(missing_ok=True)
