"""Exact key maps between Hugging Face checkpoints and FlareModel's state dict, per family.

FlareModel names its modules like the Qwen3.5 / Llama checkpoints, so most maps only move a prefix. Qwen3-Next
fuses the Gated DeltaNet input projections per key head; its map re-splits them (a pure row permutation, so the
round trip is bit-exact).
"""

from __future__ import annotations

import re

import torch

from flare.config import ModelConfig

# Tensors that real checkpoints carry beside the text model and that flare does not use.
IGNORED = (re.compile(r"^mtp\."), re.compile(r"^model\.visual\."), re.compile(r"\.rotary_emb\.inv_freq$"))


def _strip(key: str, config: ModelConfig) -> str | None:
    if key.startswith("lm_head."):
        return key
    if key.startswith(config.weight_prefix):
        return "model." + key[len(config.weight_prefix) :]
    return None


def hf_to_flare(tensors: dict[str, torch.Tensor], config: ModelConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Returns (flare state dict, keys that belong to nothing flare knows)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        if any(p.search(key) for p in IGNORED):
            continue
        name = _strip(key, config)
        if name is None:
            unknown.append(key)
            continue
        if config.family == "qwen3_next" and name.endswith(("linear_attn.in_proj_qkvz.weight", "in_proj_ba.weight")):
            out.update(_split_qwen3_next(name, t, config))
            continue
        out[name] = t
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out, unknown


def flare_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        key = name if name.startswith("lm_head.") else config.weight_prefix + name[len("model.") :]
        out[key] = t
    if config.family == "qwen3_next":
        out = _fuse_qwen3_next(out, config)
    return out


def _group_sizes(config: ModelConfig) -> tuple[int, int, int, int]:
    nk, r = config.linear_num_key_heads, config.linear_num_value_heads // config.linear_num_key_heads
    return nk, r, config.linear_key_head_dim, config.linear_value_head_dim


def _split_qwen3_next(name: str, w: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    nk, r, dk, dv = _group_sizes(config)
    base = name.rsplit(".", 2)[0]  # model.layers.i.linear_attn
    hidden = config.hidden_size
    rows = nk * (2 * dk + 2 * r * dv) if name.endswith("in_proj_qkvz.weight") else nk * 2 * r
    if tuple(w.shape) != (rows, hidden):
        raise ValueError(f"tensor {name!r} has shape {tuple(w.shape)}, the config needs {(rows, hidden)}")
    if name.endswith("in_proj_qkvz.weight"):
        per_head = 2 * dk + 2 * r * dv
        q, k, v, z = w.view(nk, per_head, hidden).split([dk, dk, r * dv, r * dv], dim=1)
        qkv = torch.cat([q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)])
        return {f"{base}.in_proj_qkv.weight": qkv, f"{base}.in_proj_z.weight": z.reshape(-1, hidden)}
    b, a = w.view(nk, 2 * r, hidden).split([r, r], dim=1)
    return {f"{base}.in_proj_b.weight": b.reshape(-1, hidden), f"{base}.in_proj_a.weight": a.reshape(-1, hidden)}


def _fuse_qwen3_next(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    nk, r, dk, dv = _group_sizes(config)
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith("linear_attn.in_proj_qkv.weight")]:
        base = key.rsplit(".", 2)[0]
        qkv, z = out.pop(key), out.pop(f"{base}.in_proj_z.weight")
        b, a = out.pop(f"{base}.in_proj_b.weight"), out.pop(f"{base}.in_proj_a.weight")
        hidden = qkv.shape[1]
        q, k, v = qkv.split([nk * dk, nk * dk, nk * r * dv])
        groups = [x.view(nk, -1, hidden) for x in (q, k, v, z.view(nk * r * dv, hidden))]
        out[f"{base}.in_proj_qkvz.weight"] = torch.cat(groups, dim=1).reshape(-1, hidden)
        out[f"{base}.in_proj_ba.weight"] = torch.cat([b.view(nk, r, hidden), a.view(nk, r, hidden)], 1).reshape(
            -1, hidden
        )
    return out
