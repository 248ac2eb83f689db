"""TrainConfig: a validated dataclass tree read from YAML/JSON, with ``--set key=value`` overrides.

Unknown keys are errors (with the known ones listed); values are type-checked; every default lives here once.
The resolved config is written next to the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flare.objective import ObjectiveConfig


@dataclass
class SourceConfig:
    path: str
    weight: float = 1.0
    name: str = ""


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    eval: str | None = None
    # A multiple of the default block size (3) and of 512: the defaults must make a valid config.
    seq_len: int = 1536
    on_error: str = "skip"  # a malformed JSONL row: "skip" (counted, reported with its line) or "raise"
    dedup: bool = False

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"data.on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {self.seq_len}")


@dataclass
class OptimConfig:
    # The paper's conversion recipe: AdamW lr 1e-5, constant after 100 warm-up steps, clip 1.0, no decay.
    lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "constant"  # or "cosine" (to min_lr_ratio * lr at the last step)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("optim.lr must be > 0, warmup_steps and grad_clip >= 0")


@dataclass
class TrainConfig:
    model: str = ""  # checkpoint directory to start from (HF layout; `flare convert` output for FLARE)
    out_dir: str = "runs/flare"
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000
    batch_size: int = 8  # rows per rank per micro-batch
    grad_accum: int = 1
    seed: int = 0
    bf16: bool = False  # compute in bfloat16: autocast on one device, FSDP2's mixed precision under torchrun
    # Parameters and optimizer state in fp32 whatever the checkpoint's stored dtype (a bf16 weight would round
    # most AdamW updates at lr 1e-5 away); checkpoints are still written in the stored dtype, the fp32 master
    # goes into the resume state.
    fp32_master: bool = True
    # Recompute each decoder layer in backward: true, false, or null (auto: on when a forward's row holds at
    # least `checkpoint_from_tokens` tokens, counting every noisy view of the FLARE layout).
    activation_checkpointing: bool | None = None
    checkpoint_from_tokens: int = 2048
    save_every: int = 500
    keep_last: int = 2
    eval_every: int = 0  # 0: never
    eval_batches: int = 8
    log_every: int = 1
    progress: bool = True
    device: str = "auto"  # auto: cuda when available, else cpu

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "save_every", "keep_last", "log_every",
                     "checkpoint_from_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.data.seq_len % self.objective.block_size:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) must be a multiple of objective.block_size "
                             f"({self.objective.block_size})")

    @property
    def row_tokens(self) -> int:
        """Tokens in one row of a training forward: the clean stream plus every noisy view."""
        o = self.objective
        if o.kind == "ar":
            return self.data.seq_len
        views = 2 if o.complementary else 1
        return self.data.seq_len * (1 + (views if o.share_clean else 1))

    @property
    def checkpointing(self) -> bool:
        """Whether decoder layers are recomputed in backward (the resolved `activation_checkpointing`)."""
        if self.activation_checkpointing is None:
            return self.row_tokens >= self.checkpoint_from_tokens
        return self.activation_checkpointing


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where or 'config'} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads exponents without a dot, `lr: 1e-5` or `--set optim.lr=1e-4`, as strings.
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where} must be float, got {value!r}") from None
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ValueError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, raw: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ValueError(f"unknown config key {key!r}; known keys here: {', '.join(names)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in raw]
    if missing:
        key = f"{where}.{missing[0]}" if where else missing[0]
        raise ValueError(f"missing config key {key!r}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``a.b=value`` strings (values parsed as YAML) into a nested dict, in place of earlier values."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set takes key=value, got {item!r}")
        key, text = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            raw = json.loads(text) if path.suffix == ".json" else (yaml.safe_load(text) or {})
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a mapping at the top level")
    return from_dict(TrainConfig, apply_overrides(raw, list(overrides)))


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
