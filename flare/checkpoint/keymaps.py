"""Exact key maps between Hugging Face checkpoints and FlareModel's state dict, per family.

FlareModel keeps HF module names except where it fuses projections that read the same input (one GEMM instead
of several per layer): ``self_attn.qkv_proj`` = q|k|v, ``mlp.gate_up_proj`` = gate|up and
``linear_attn.in_proj`` = qkv|z|b|a (Qwen3.5 layout). Qwen3-Next fuses its Gated DeltaNet projections per key
head instead; its map permutes those rows into the Qwen3.5 layout. Every map is a pure row permutation or
concatenation, so a round trip is bit-exact.
"""

from __future__ import annotations

import re

import torch

from flare.config import ModelConfig

# Tensors that real checkpoints carry beside the text model and that flare does not use.
IGNORED = (re.compile(r"^mtp\."), re.compile(r"^model\.visual\."), re.compile(r"\.rotary_emb\.inv_freq$"))

# flare's fused projection -> the HF projections it concatenates, in row order.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "linear_attn.in_proj": (
        "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b", "linear_attn.in_proj_a",
    ),
}


def fused_sizes(config: ModelConfig) -> dict[str, list[int]]:
    """Rows of each part of each fused projection."""
    q_rows = config.num_attention_heads * config.head_dim * (2 if config.attn_output_gate else 1)
    kv_rows = config.num_key_value_heads * config.head_dim
    key_dim = config.linear_num_key_heads * config.linear_key_head_dim
    value_dim = config.linear_num_value_heads * config.linear_value_head_dim
    nv = config.linear_num_value_heads
    return {
        "self_attn.qkv_proj": [q_rows, kv_rows, kv_rows],
        "mlp.gate_up_proj": [config.intermediate_size, config.intermediate_size],
        "linear_attn.in_proj": [2 * key_dim + value_dim, value_dim, nv, nv],
    }


def _split_name(name: str) -> tuple[str, str, str] | None:
    """'model.layers.3.mlp.gate_up_proj.weight' -> ('model.layers.3.', 'mlp.gate_up_proj', 'weight')."""
    m = re.match(r"^(model\.layers\.\d+\.)(.+)\.(weight|bias)$", name)
    if m and m.group(2) in FUSED:
        return m.group(1), m.group(2), m.group(3)
    return None


def flare_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """flare state dict -> tensors named and laid out as the family's HF checkpoint."""
    sizes = fused_sizes(config)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        parts = _split_name(name)
        pieces = {name: t}
        if parts is not None:
            layer, fused, kind = parts
            pieces = {
                f"{layer}{hf}.{kind}": chunk for hf, chunk in zip(FUSED[fused], t.split(sizes[fused], dim=0))
            }
        for key, piece in pieces.items():
            out[key if key.startswith("lm_head.") else config.weight_prefix + key[len("model.") :]] = piece
    if config.family == "qwen3_next":
        out = _fuse_qwen3_next(out, config)
    return out


def expected_hf_shapes(flare_shapes: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The HF key -> shape table a checkpoint of ``config`` must match (from a meta-device state dict)."""
    return {k: tuple(v.shape) for k, v in flare_to_hf(flare_shapes, config).items()}


def hf_to_flare(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors (already checked against ``expected_hf_shapes``) -> flare state dict."""
    local: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.startswith("lm_head."):
            if not config.tie_word_embeddings:
                local[key] = t
        elif key.startswith(config.weight_prefix):
            local["model." + key[len(config.weight_prefix) :]] = t
    if config.family == "qwen3_next":
        local = _split_qwen3_next(local, config)
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for name, t in local.items():
        m = re.match(r"^(model\.layers\.\d+\.)(.+)\.(weight|bias)$", name)
        owner = next((f for f, parts in FUSED.items() if m and m.group(2) in parts), None)
        if owner is None:
            out[name] = t
        else:
            groups.setdefault((m.group(1), owner, m.group(3)), {})[m.group(2)] = t
    for (layer, fused, kind), parts in groups.items():
        out[f"{layer}{fused}.{kind}"] = torch.cat([parts[p] for p in FUSED[fused]], dim=0)
    return out


def ignored(key: str) -> bool:
    return any(p.search(key) for p in IGNORED)


def _group_sizes(config: ModelConfig) -> tuple[int, int, int, int]:
    nk, r = config.linear_num_key_heads, config.linear_num_value_heads // config.linear_num_key_heads
    return nk, r, config.linear_key_head_dim, config.linear_value_head_dim


def _split_qwen3_next(local: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Per-key-head fused [q, k, v, z] and [b, a] rows -> the Qwen3.5 split projections."""
    nk, r, dk, dv = _group_sizes(config)
    out = dict(local)
    for name in [n for n in local if n.endswith("linear_attn.in_proj_qkvz.weight")]:
        base = name[: -len(".in_proj_qkvz.weight")]
        w, ba = out.pop(name), out.pop(f"{base}.in_proj_ba.weight")
        hidden = w.shape[1]
        q, k, v, z = w.view(nk, -1, hidden).split([dk, dk, r * dv, r * dv], dim=1)
        out[f"{base}.in_proj_qkv.weight"] = torch.cat([x.reshape(-1, hidden) for x in (q, k, v)])
        out[f"{base}.in_proj_z.weight"] = z.reshape(-1, hidden)
        b, a = ba.view(nk, 2 * r, hidden).split([r, r], dim=1)
        out[f"{base}.in_proj_b.weight"], out[f"{base}.in_proj_a.weight"] = b.reshape(-1, hidden), a.reshape(-1, hidden)
    return out


def _fuse_qwen3_next(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    nk, r, dk, dv = _group_sizes(config)
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith("linear_attn.in_proj_qkv.weight")]:
        base = key.rsplit(".", 2)[0]
        qkv, z = out.pop(key), out.pop(f"{base}.in_proj_z.weight")
        b, a = out.pop(f"{base}.in_proj_b.weight"), out.pop(f"{base}.in_proj_a.weight")
        hidden = qkv.shape[1]
        q, k, v = qkv.split([nk * dk, nk * dk, nk * r * dv])
        groups = [x.reshape(nk, -1, hidden) for x in (q, k, v, z)]
        out[f"{base}.in_proj_qkvz.weight"] = torch.cat(groups, dim=1).reshape(-1, hidden)
        out[f"{base}.in_proj_ba.weight"] = torch.cat(
            [b.reshape(nk, r, hidden), a.reshape(nk, r, hidden)], 1
        ).reshape(-1, hidden)
    return out
