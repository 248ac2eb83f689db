"""ModelConfig: the architecture of a checkpoint, read from and written to a Hugging Face ``config.json``.

Architecture only: training and decoding settings live in their own dataclasses. The original ``config.json``
is kept in ``hf_config`` so that saving writes back every field we do not interpret, unchanged.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"
# The FLARE noisy block when nothing else says: the released recipe's internal block of 3 (method §2). Training
# takes it as its default, and decoding modes size their MASK rows from it for checkpoints that record no block.
DEFAULT_BLOCK_SIZE = 3

# model_type -> family. The family decides the per-layer numerics and the checkpoint key map.
FAMILIES = {
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "qwen3_next": "qwen3_next",
    "llama": "llama",
    "qwen3": "qwen3",
}

ARCHITECTURES = {
    "qwen3_5": "Qwen3_5ForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class ConfigError(ValueError):
    """A config.json that flare cannot turn into a model it implements exactly."""


@dataclass
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: list[str]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # Qwen3.5 / Qwen3-Next: q_proj also yields a sigmoid output gate; norms are x_hat * (1 + w).
    attn_output_gate: bool = False
    qk_norm: bool = False
    norm_zero_centered: bool = False
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # The [MASK] row used by the diffusion stream; set by `flare convert`, None for a plain AR checkpoint.
    mask_token_id: int | None = None
    # The noisy block size the diffusion stream was trained with (written by FLARE training; None: unknown).
    # MASK rows in runs longer than this were never trained.
    block_size: int | None = None

    @property
    def trained_block(self) -> int:
        """The noisy block decoding modes size their MASK rows by: the recorded one, else the default."""
        return self.block_size if self.block_size is not None else DEFAULT_BLOCK_SIZE

    # Checkpoints whose text model sits inside a multimodal wrapper keep their weights under this prefix.
    weight_prefix: str = "model."
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        for t in self.layer_types:
            if t not in (FULL_ATTENTION, LINEAR_ATTENTION):
                raise ConfigError(f"unknown layer type {t!r} (expected {FULL_ATTENTION!r} or {LINEAR_ATTENTION!r})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.has_linear_attention:
            if self.linear_num_key_heads < 1 or self.linear_num_value_heads % self.linear_num_key_heads:
                raise ConfigError("linear_num_value_heads must be a positive multiple of linear_num_key_heads")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise ConfigError(f"flare.block_size must be a positive integer, got {self.block_size!r}")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(f"mask_token_id {self.mask_token_id} is outside the vocabulary (size {self.vocab_size})")

    def with_vocab(self, vocab_size: int, mask_token_id: int | None) -> "ModelConfig":
        """A copy with a new vocabulary size and [MASK] id, its saved config.json updated to match."""
        raw = copy.deepcopy(self.hf_config)
        text = raw.get("text_config", raw) if self.weight_prefix != "model." else raw
        text["vocab_size"] = vocab_size
        out = copy.copy(self)
        out.vocab_size, out.mask_token_id, out.hf_config = vocab_size, mask_token_id, raw
        out.__post_init__()
        return out

    @property
    def has_linear_attention(self) -> bool:
        return LINEAR_ATTENTION in self.layer_types

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in FAMILIES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; flare implements: {', '.join(sorted(FAMILIES))}"
            )
        family = FAMILIES[model_type]
        text = raw
        prefix = "model."
        if model_type == "qwen3_5" and "text_config" in raw:
            # The multimodal wrapper: the language model's config and weights sit one level down.
            text = dict(raw["text_config"])
            prefix = "model.language_model."
        if family == "qwen3_next":
            _reject_moe(text)

        hidden = _require(text, "hidden_size")
        heads = _require(text, "num_attention_heads")
        n_layers = _require(text, "num_hidden_layers")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope_type {rope_type!r} is not supported yet (only 'default')")
        hybrid = family in ("qwen3_5", "qwen3_next")
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = text.get("full_attention_interval", 4) if hybrid else 1
            layer_types = [
                LINEAR_ATTENTION if hybrid and (i + 1) % interval else FULL_ATTENTION for i in range(n_layers)
            ]
        default_partial = 0.25 if hybrid else 1.0
        return cls(
            family=family,
            vocab_size=_require(text, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_require(text, "intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or hidden // heads,
            layer_types=list(layer_types),
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
            partial_rotary_factor=float(
                rope.get("partial_rotary_factor", text.get("partial_rotary_factor", default_partial))
            ),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            attention_bias=bool(text.get("attention_bias", False)),
            attn_output_gate=hybrid,
            qk_norm=family in ("qwen3_5", "qwen3_next", "qwen3"),
            norm_zero_centered=hybrid,
            linear_conv_kernel_dim=text.get("linear_conv_kernel_dim", 4),
            linear_key_head_dim=text.get("linear_key_head_dim", 0) if hybrid else 0,
            linear_value_head_dim=text.get("linear_value_head_dim", 0) if hybrid else 0,
            linear_num_key_heads=text.get("linear_num_key_heads", 0) if hybrid else 0,
            linear_num_value_heads=text.get("linear_num_value_heads", 0) if hybrid else 0,
            bos_token_id=text.get("bos_token_id", raw.get("bos_token_id")),
            eos_token_id=text.get("eos_token_id", raw.get("eos_token_id")),
            pad_token_id=text.get("pad_token_id", raw.get("pad_token_id")),
            mask_token_id=(raw.get("flare") or {}).get("mask_token_id"),
            block_size=(raw.get("flare") or {}).get("block_size"),
            weight_prefix=prefix,
            hf_config=copy.deepcopy(raw),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json to save: the original fields, with flare's own block updated."""
        out = copy.deepcopy(self.hf_config) or {
            "model_type": self.family if self.family != "qwen3_5" else "qwen3_5_text",
            "architectures": [ARCHITECTURES[self.family]],
        }
        if self.mask_token_id is not None:
            out.setdefault("flare", {})["mask_token_id"] = self.mask_token_id
        if self.block_size is not None:
            out.setdefault("flare", {})["block_size"] = self.block_size
        return out

    @classmethod
    def new_hybrid(
        cls,
        *,
        vocab_size: int,
        hidden_size: int,
        num_hidden_layers: int,
        intermediate_size: int,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int = 32,
        linear_num_key_heads: int = 2,
        linear_num_value_heads: int = 4,
        linear_key_head_dim: int = 32,
        linear_value_head_dim: int = 32,
        full_attention_interval: int = 4,
        tie_word_embeddings: bool = True,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        rope_theta: float = 10_000_000.0,
    ) -> "ModelConfig":
        """A fresh Qwen3.5-style hybrid (3 of 4 layers GDN), as the config.json transformers would write."""
        raw = {
            "model_type": "qwen3_5_text",
            "architectures": ["Qwen3_5ForCausalLM"],
            "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers, "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads, "head_dim": head_dim, "hidden_act": "silu",
            "layer_types": [
                LINEAR_ATTENTION if (i + 1) % full_attention_interval else FULL_ATTENTION
                for i in range(num_hidden_layers)
            ],
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": linear_key_head_dim,
            "linear_value_head_dim": linear_value_head_dim, "linear_num_key_heads": linear_num_key_heads,
            "linear_num_value_heads": linear_num_value_heads, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.25},
            "max_position_embeddings": 32768, "attention_bias": False, "attention_dropout": 0.0,
            "tie_word_embeddings": tie_word_embeddings, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
            "bos_token_id": None, "dtype": "float32",
        }
        return cls.from_hf_dict(raw)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(raw)

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")


def _require(d: dict[str, Any], key: str) -> Any:
    if key not in d:
        raise ConfigError(f"config.json is missing {key!r}")
    return d[key]


def _reject_moe(text: dict[str, Any]) -> None:
    n_layers = text.get("num_hidden_layers", 0)
    experts = text.get("num_experts", 0) or 0
    step = text.get("decoder_sparse_step", 1) or 1
    mlp_only = set(text.get("mlp_only_layers") or [])
    moe_layers = [i for i in range(n_layers) if experts > 0 and i not in mlp_only and (i + 1) % step == 0]
    if moe_layers:
        raise ConfigError(
            f"Qwen3-Next mixture-of-experts layers ({len(moe_layers)} of {n_layers}) are not supported yet; "
            "only dense Qwen3-Next configs (num_experts=0 or every layer in mlp_only_layers) load"
        )
