"""Seeded tiny random checkpoints of every supported family, built with transformers (the reference
implementation) and saved as real HF directories. Tests, benchmarks and examples use these; nothing is
downloaded and no weights are committed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("qwen3_5", "qwen3_next", "llama", "qwen3")

_BASE: dict[str, Any] = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
    # 1e-5 (as in Llama) keeps the random models well conditioned: with 1e-6 the gated norm of a near-zero GDN
    # output amplifies fp32 round-off enough to blur implementation parity checks.
    rms_norm_eps=1e-5,
)
_HYBRID: dict[str, Any] = dict(
    linear_key_head_dim=8, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_conv_kernel_dim=4,
)


def hf_config(family: str, **overrides: Any):
    """A transformers config object for a tiny model of ``family``."""
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    kw = dict(_BASE)
    if family in ("qwen3_5", "qwen3_next"):
        kw.update(_HYBRID)
    if family == "qwen3_next":
        kw.update(num_experts=0)
    kw.update(overrides)
    cls = {"qwen3_5": tf.Qwen3_5TextConfig, "qwen3_next": tf.Qwen3NextConfig,
           "llama": tf.LlamaConfig, "qwen3": tf.Qwen3Config}[family]
    return cls(**kw)


def hf_model(family: str, seed: int = 0, **overrides: Any):
    """A tiny transformers model of ``family`` with every parameter drawn from a seeded generator.

    Scales are chosen so that logits are well separated (greedy decoding has no near-ties) and every norm,
    decay and conv weight differs from its default, so a wrongly mapped tensor cannot go unnoticed.
    """
    import transformers as tf

    config = hf_config(family, **overrides)
    cls = {"qwen3_5": tf.Qwen3_5ForCausalLM, "qwen3_next": tf.Qwen3NextForCausalLM,
           "llama": tf.LlamaForCausalLM, "qwen3": tf.Qwen3ForCausalLM}[family]
    torch.manual_seed(seed)
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    zero_centered = family in ("qwen3_5", "qwen3_next")
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 7 + 1))
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * r)
            elif "norm" in name:
                base = 0.0 if zero_centered and not name.endswith("linear_attn.norm.weight") else 1.0
                p.copy_(base + 0.1 * r)
            elif "embed_tokens" in name:
                # Small enough that a tied head gives logits of a few units (an untied one, see below, of ~1).
                p.copy_(0.15 * r)
            elif name == "lm_head.weight":
                # Logits of order 1: absolute parity bounds then mean a few fp32 ulps, while the top two logits
                # of a 96-way softmax stay far apart compared with round-off (no greedy near-ties).
                p.copy_(r * (0.3 / math.sqrt(p.shape[-1])))
            elif "conv1d" in name:
                p.copy_(0.5 * r)
            elif p.ndim >= 2:
                # A gain of 0.5 keeps the random stack well conditioned: larger gains make GDN outputs nearly
                # cancel for some tokens, and their gated norm then magnifies fp32 round-off past 1e-4.
                p.copy_(r * (0.5 / math.sqrt(p.shape[-1])))
            else:
                p.copy_(0.1 * r)
    return model


def save_tiny_checkpoint(path: str | Path, family: str = "qwen3_5", seed: int = 0, *, tokenizer: bool = True,
                         **overrides: Any) -> Path:
    """Build, save and return the directory of a tiny checkpoint (plus a character tokenizer by default)."""
    path = Path(path)
    model = hf_model(family, seed, **overrides)
    model.save_pretrained(path)
    if tokenizer:
        write_char_tokenizer(path, model.config.vocab_size)
    return path


ALPHABET = "\n 0123456789+-*/=()<>.,:;!?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def write_char_tokenizer(path: str | Path, vocab_size: int) -> None:
    """A character-level tokenizer.json: ids 0..3 special, then one id per character, up to ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    chars = list(ALPHABET[: max(0, vocab_size - len(specials))])
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.save(str(Path(path) / "tokenizer.json"))
    cfg = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    Path(path, "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


# Qwen3.5-0.8B's text model as a shape: hidden 1024, 24 layers (every 4th gated attention, the rest Gated DeltaNet),
# tied 248,320-token vocabulary; 0.75B parameters, a third of them the embedding. Keys are ModelConfig.new_hybrid's.
REAL_QWEN3_5: dict[str, Any] = dict(
    vocab_size=248_320, hidden_size=1024, num_hidden_layers=24, intermediate_size=3584, num_attention_heads=8,
    num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
    linear_value_head_dim=128, full_attention_interval=4, tie_word_embeddings=True,
)


def save_random_hybrid(path: str | Path, seed: int = 0, *, dtype: torch.dtype = torch.bfloat16, std: float = 0.02,
                       mask_token_id: int | None = None, **shape: Any) -> Path:
    """Write a seeded random Qwen3.5-style hybrid of any size (default ``REAL_QWEN3_5``) straight to ``path`` as
    a Hugging Face checkpoint in ``dtype``, in seconds at real size: no transformers model is built, and every
    tensor is drawn in place in its stored dtype (uniform draws of standard deviation ``std``; decays, gates and
    norms as ``FlareModel.init_weights`` sets them). The config.json is the one transformers writes for
    ``Qwen3_5ForCausalLM``, so flare and transformers load the same weights. ``mask_token_id`` records a
    [MASK] row (a FLARE checkpoint)."""
    from flare.checkpoint import write_tensors
    from flare.checkpoint.keymaps import expected_hf_shapes
    from flare.config import ModelConfig
    from flare.model import FlareModel

    path = Path(path)
    config = ModelConfig.new_hybrid(**{**REAL_QWEN3_5, **shape})
    config.hf_config["dtype"] = str(dtype).removeprefix("torch.")
    config.mask_token_id = mask_token_id
    config.__post_init__()
    with torch.device("meta"):
        shapes = expected_hf_shapes(FlareModel(config).state_dict(), config)
    gen = torch.Generator().manual_seed(seed)
    half_width = std * math.sqrt(3.0)  # U(-a, a) has standard deviation a / sqrt(3)
    tensors = {}
    for name in sorted(shapes):
        t = torch.empty(shapes[name], dtype=dtype, device="cpu")  # written from host memory
        if name.endswith("A_log"):  # decay rates A in [1, 16]
            t.copy_(torch.log(torch.empty(t.shape, device="cpu").uniform_(1.0, 16.0, generator=gen)))
        elif name.endswith(("dt_bias", "linear_attn.norm.weight")):
            t.fill_(1.0)
        elif "norm" in name:
            t.fill_(0.0)  # Qwen3.5's other norms scale by 1 + w
        elif "conv1d" in name:
            a = math.sqrt(3.0 / t.shape[-1])
            t.uniform_(-a, a, generator=gen)
        else:
            t.uniform_(-half_width, half_width, generator=gen)
        tensors[name] = t
    write_tensors(tensors, path)
    config.save(path)
    return path
