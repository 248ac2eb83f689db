"""Tests for flare.checkpoint and flare.config: logits parity with transformers, save/load round trips, the
multimodal wrapper layout, sharded safetensors, bad inputs and dtype handling.

Every checkpoint is a tiny seeded random model built by transformers (flare.testing.checkpoints), so the
transformers classes are the numerical oracle and nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import flare  # noqa: E402
from flare.checkpoint import CheckpointError, load_model, save_model  # noqa: E402
from flare.checkpoint.io import INDEX, SINGLE, read_tensors, write_tensors  # noqa: E402
from flare.config import FULL_ATTENTION, LINEAR_ATTENTION, ConfigError, ModelConfig  # noqa: E402
from flare.testing.checkpoints import hf_model, save_tiny_checkpoint  # noqa: E402

VOCAB = 96  # flare.testing.checkpoints' tiny vocabulary
LENGTHS = (1, 63, 130)
BATCH = 2
F, L = FULL_ATTENTION, LINEAR_ATTENTION


def prompt(T: int, batch: int = BATCH, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(1000 + seed + T))


@torch.no_grad()
def flare_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2))


def clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(directory: Path, fn) -> None:
    tensors = load_file(directory / SINGLE)
    fn(tensors)
    save_file(tensors, str(directory / SINGLE), metadata={"format": "pt"})


def edit_config(directory: Path, fn) -> None:
    cfg = read_json(directory / "config.json")
    fn(cfg)
    write_json(directory / "config.json", cfg)


# ---------------------------------------------------------------------------------------------- shared checkpoints
# name -> (family, seed, overrides). Each is built once per module, on first use.
SHARED = {
    "qwen3_5": ("qwen3_5", 0, {}),
    "qwen3_5_tied": ("qwen3_5", 3, {"tie_word_embeddings": True}),
    "qwen3_next": ("qwen3_next", 1, {}),
    "llama": ("llama", 2, {}),
    "llama_tied": ("llama", 5, {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", 4, {}),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(name) -> directory of the shared checkpoint ``name`` (read-only: clone it before editing)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            family, seed, overrides = SHARED[name]
            built[name] = save_tiny_checkpoint(tmp_path_factory.mktemp(name) / "ckpt", family, seed, **overrides)
        return built[name]

    return get


@pytest.fixture(scope="module")
def reference(tiny):
    """reference(name) -> (flare fp32 model, transformers model) for a shared checkpoint, cached."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            family, seed, overrides = SHARED[name]
            cache[name] = (load_model(tiny(name)), hf_model(family, seed, **overrides))
        return cache[name]

    return get


# ------------------------------------------------------------------------------------------ 1. parity with HF
# (id, family, seed, overrides, full_attention_interval written into config.json instead of layer_types)
PARITY = [
    ("qwen3_5-default", "qwen3_5", 10, {}, None),
    ("qwen3_5-attn-first-tied-hd8", "qwen3_5", 11,
     dict(layer_types=[F, L, L, F], tie_word_embeddings=True, head_dim=8), None),
    ("qwen3_5-one-attn-kv1-v2-hd32", "qwen3_5", 12,
     dict(layer_types=[L, L, F, L], num_key_value_heads=1, linear_num_value_heads=2, head_dim=32), None),
    ("qwen3_5-interval2-kv4", "qwen3_5", 13, dict(layer_types=None, full_attention_interval=2,
                                                  num_key_value_heads=4), 2),
    ("qwen3_next-default", "qwen3_next", 14, {}, None),
    ("qwen3_next-attn-first-tied-kv1-v2", "qwen3_next", 16,
     dict(layer_types=[F, L, L, L], tie_word_embeddings=True, num_key_value_heads=1, linear_num_value_heads=2),
     None),
    ("qwen3_next-interval2-hd32-kv4", "qwen3_next", 22,
     dict(layer_types=None, full_attention_interval=2, head_dim=32, num_key_value_heads=4), 2),
    ("llama-default", "llama", 17, {}, None),
    ("llama-tied-kv1-hd8", "llama", 18, dict(tie_word_embeddings=True, num_key_value_heads=1, head_dim=8), None),
    ("llama-kv4-hd32-bias", "llama", 19, dict(num_key_value_heads=4, head_dim=32, attention_bias=True), None),
    ("qwen3-default", "qwen3", 20, {}, None),
    ("qwen3-tied-kv1-hd32", "qwen3", 21, dict(tie_word_embeddings=True, num_key_value_heads=1, head_dim=32), None),
]


@pytest.mark.parametrize("family,seed,overrides,interval", [p[1:] for p in PARITY], ids=[p[0] for p in PARITY])
def test_logits_match_transformers(tmp_path, family, seed, overrides, interval):
    path = save_tiny_checkpoint(tmp_path / "ckpt", family, seed, tokenizer=False, **overrides)
    ref = hf_model(family, seed, **overrides)
    if interval is not None:
        # Exercise flare's own layer_types fallback: drop the explicit list, keep only the interval.
        expected_types = list(ref.config.layer_types)
        edit_config(path, lambda c: (c.pop("layer_types"), c.update(full_attention_interval=interval)))
        assert "layer_types" not in read_json(path / "config.json")
    model = flare.load_model(path, dtype=torch.float32)
    cfg = model.config
    # The knobs under test really reached the model.
    assert cfg.family == family
    ref_types = getattr(ref.config, "layer_types", None) or [F] * ref.config.num_hidden_layers  # Llama: none
    assert cfg.layer_types == list(ref_types)
    if interval is not None:
        assert cfg.layer_types == expected_types
    assert cfg.tie_word_embeddings == bool(overrides.get("tie_word_embeddings", False))
    assert cfg.head_dim == ref.config.head_dim
    assert cfg.num_key_value_heads == ref.config.num_key_value_heads
    if family in ("qwen3_5", "qwen3_next"):
        assert cfg.linear_num_value_heads == ref.config.linear_num_value_heads
    assert next(model.parameters()).dtype == torch.float32
    for T in LENGTHS:
        ids = prompt(T, seed=seed)
        got, want = flare_logits(model, ids), hf_logits(ref, ids)
        assert got.shape == (BATCH, T, VOCAB)
        assert torch.isfinite(got).all()
        err = max_diff(got, want)
        assert err <= 1e-4, f"T={T}: max |flare - transformers| = {err:.3e}"


# ------------------------------------------------------------------------------------------- 2. round trip
ROUND_TRIP = ["qwen3_5", "qwen3_5_tied", "qwen3_next", "llama", "llama_tied", "qwen3"]


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_hf_flare_hf(tmp_path, tiny, reference, name):
    import transformers as tf

    src = tiny(name)
    model, ref = reference(name)
    out = tmp_path / "saved"
    save_model(model, out, tokenizer_from=src)

    # Same tensors, bit for bit, under exactly the same keys (qwen3_next: in_proj_qkvz / in_proj_ba re-fused).
    original, saved = load_file(src / SINGLE), load_file(out / SINGLE)
    assert set(saved) == set(original), (
        f"only in flare's save: {sorted(set(saved) - set(original))}; "
        f"only in HF's: {sorted(set(original) - set(saved))}"
    )
    for key, t in original.items():
        assert saved[key].dtype == t.dtype and torch.equal(saved[key], t), key
    if SHARED[name][2].get("tie_word_embeddings"):
        assert "lm_head.weight" not in saved
    assert not (out / INDEX).exists()
    assert not list(out.glob(".*.tmp"))
    # config.json: every field of the original, unchanged; tokenizer files copied.
    assert read_json(out / "config.json") == read_json(src / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()

    # transformers reads flare's save with nothing missing or unexpected, and computes the same logits.
    back, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    back.eval()
    assert type(back) is type(ref)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = prompt(63, seed=7)
    want = hf_logits(ref, ids)
    got = hf_logits(back, ids)
    assert max_diff(got, want) <= 1e-6
    # And flare reads its own save back to the same logits.
    assert torch.equal(flare_logits(load_model(out), ids), flare_logits(model, ids))


def test_qwen3_next_fused_projections_split_and_refuse(reference, tiny):
    """The fused Qwen3-Next tensors are split into flare's per-role projections and re-fused exactly."""
    from flare.checkpoint.keymaps import flare_to_hf, hf_to_flare

    model, ref = reference("qwen3_next")
    cfg = model.config
    state = hf_to_flare(load_file(tiny("qwen3_next") / SINGLE), cfg)
    i = cfg.layer_types.index(LINEAR_ATTENTION)
    base = f"model.layers.{i}.linear_attn"
    assert f"{base}.in_proj_qkvz.weight" not in state and f"{base}.in_proj_ba.weight" not in state
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    # flare's in_proj rows: q (all key heads) | k | v (all value heads) | z | b | a.
    in_proj = state[f"{base}.in_proj.weight"]
    assert in_proj.shape == (2 * nk * dk + 2 * nv * dv + 2 * nv, cfg.hidden_size)
    # Per key head h the fused rows are [q_h, k_h, v_h (r heads), z_h (r heads)]: check head 1's q block.
    fused = ref.model.layers[i].linear_attn.in_proj_qkvz.weight.detach()
    per_head = 2 * dk + 2 * (nv // nk) * dv
    assert torch.equal(in_proj[dk : 2 * dk], fused[per_head : per_head + dk])
    back = flare_to_hf(state, cfg)
    assert torch.equal(back[f"{base}.in_proj_qkvz.weight"], fused)
    assert torch.equal(back[f"{base}.in_proj_ba.weight"], ref.model.layers[i].linear_attn.in_proj_ba.weight)


# ----------------------------------------------------------------------------------- 3. multimodal wrapper
def to_multimodal_layout(text_dir: Path, out: Path) -> Path:
    out.mkdir()
    text_cfg = read_json(text_dir / "config.json")
    text_cfg["model_type"] = "qwen3_5_text"
    text_cfg.pop("architectures", None)
    rope = dict(text_cfg["rope_parameters"])
    rope.update(mrope_interleaved=True, mrope_section=[1, 1, 0])  # as in real Qwen3.5 configs; text-only = plain
    text_cfg["rope_parameters"] = rope
    write_json(out / "config.json", {
        "model_type": "qwen3_5",
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "text_config": text_cfg,
        "vision_config": {"model_type": "qwen3_5", "depth": 1, "hidden_size": 32, "out_hidden_size": 64},
        "image_token_id": 90,
        "video_token_id": 91,
        "tie_word_embeddings": text_cfg["tie_word_embeddings"],
    })
    gen = torch.Generator().manual_seed(99)
    tensors = {}
    for key, t in load_file(text_dir / SINGLE).items():
        new = "model.language_model." + key[len("model."):] if key.startswith("model.") else key
        tensors[new] = t
    tensors["model.visual.patch_embed.proj.weight"] = torch.randn(32, 3, 2, 4, 4, generator=gen)
    tensors["mtp.fc.weight"] = torch.randn(64, 128, generator=gen)
    save_file(tensors, str(out / SINGLE), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_5_tied"])
def test_multimodal_wrapper_layout(tmp_path, tiny, reference, name):
    mm = to_multimodal_layout(tiny(name), tmp_path / "mm")
    text_model, ref = reference(name)
    model = load_model(mm)
    cfg = model.config
    assert cfg.family == "qwen3_5"
    assert cfg.weight_prefix == "model.language_model."
    assert cfg.layer_types == text_model.config.layer_types
    assert cfg.rotary_dim == text_model.config.rotary_dim
    assert cfg.tie_word_embeddings == text_model.config.tie_word_embeddings
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for T in LENGTHS:
        ids = prompt(T, seed=3)
        got = flare_logits(model, ids)
        assert torch.equal(got, flare_logits(text_model, ids)), f"T={T}"
        assert max_diff(got, hf_logits(ref, ids)) <= 1e-4

    # Saving keeps the wrapper layout (config and key prefix); the unused vision/MTP tensors are not carried.
    out = tmp_path / "mm_saved"
    save_model(model, out)
    assert read_json(out / "config.json") == read_json(mm / "config.json")
    keys = set(load_file(out / SINGLE))
    expected = {k for k in load_file(mm / SINGLE) if not k.startswith(("model.visual.", "mtp."))}
    assert keys == expected
    ids = prompt(63, seed=4)
    assert torch.equal(flare_logits(load_model(out), ids), flare_logits(model, ids))


def test_multimodal_layout_rejects_text_layout_keys(tmp_path, tiny):
    """Under the wrapper config, a tensor outside model.language_model.* (and not ignored) is an error."""
    mm = to_multimodal_layout(tiny("qwen3_5"), tmp_path / "mm")
    edit_tensors(mm, lambda t: t.update({"model.norm.weight": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=re.escape("'model.norm.weight'")):
        load_model(mm)


# -------------------------------------------------------------------------------------------- 4. sharding
def test_sharded_write_read_load(tmp_path, tiny, reference):
    src = tiny("qwen3_5")
    tensors = read_tensors(src)
    assert set(tensors) == set(load_file(src / SINGLE))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    limit = 40_000
    assert total > 4 * limit

    sharded = tmp_path / "sharded"
    write_tensors(tensors, sharded, max_shard_bytes=limit)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    n = len(shards)
    assert n >= 4
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (sharded / SINGLE).exists()
    assert not list(sharded.glob(".*.tmp"))
    index = read_json(sharded / INDEX)
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        on_disk = load_file(sharded / shard)
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(on_disk)
        nbytes = sum(t.numel() * t.element_size() for t in on_disk.values())
        assert nbytes <= limit or len(on_disk) == 1

    back = read_tensors(sharded)
    assert set(back) == set(tensors)
    for key, t in tensors.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key

    # load_model reads the sharded directory to the same model.
    shutil.copy(src / "config.json", sharded / "config.json")
    model = flare.load_model(sharded)
    ref_model, _ = reference("qwen3_5")
    ids = prompt(130, seed=5)
    assert torch.equal(flare_logits(model, ids), flare_logits(ref_model, ids))

    # Rewriting the same directory as one file drops the stale index, so the new file is what gets read.
    changed = dict(tensors)
    changed["model.norm.weight"] = tensors["model.norm.weight"] + 1.0
    write_tensors(changed, sharded)
    assert (sharded / SINGLE).exists() and not (sharded / INDEX).exists()
    assert torch.equal(read_tensors(sharded)["model.norm.weight"], changed["model.norm.weight"])


def test_single_tensor_larger_than_shard_limit_gets_its_own_shard(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(10, generator=gen), "big": torch.randn(1000, generator=gen),
               "c": torch.randn(10, generator=gen)}
    write_tensors(tensors, tmp_path, max_shard_bytes=100)
    index = read_json(tmp_path / INDEX)["weight_map"]
    assert len(set(index.values())) == 3
    back = read_tensors(tmp_path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items()) and set(back) == set(tensors)


# ------------------------------------------------------------------------------------------- 5. bad inputs
def test_unknown_model_type(tmp_path, tiny):
    d = clone(tiny("llama"), tmp_path / "c")
    edit_config(d, lambda c: c.update(model_type="gpt2"))
    with pytest.raises(ConfigError, match="gpt2"):
        load_model(d)


@pytest.mark.parametrize("moe,loads", [
    (dict(num_experts=4, decoder_sparse_step=1, mlp_only_layers=[]), False),
    (dict(num_experts=4, decoder_sparse_step=2, mlp_only_layers=[0]), False),
    (dict(num_experts=4, decoder_sparse_step=1, mlp_only_layers=[0, 1, 2, 3]), True),
    (dict(num_experts=4, decoder_sparse_step=2, mlp_only_layers=[1, 3]), True),
], ids=["all-moe", "some-moe", "mlp-only", "sparse-step-mlp-only"])
def test_qwen3_next_moe_rejected(tmp_path, tiny, moe, loads):
    d = clone(tiny("qwen3_next"), tmp_path / "c")
    edit_config(d, lambda c: c.update(moe))
    if loads:  # every layer is dense after all: the checkpoint is an ordinary dense one
        load_model(d)
    else:
        with pytest.raises(ConfigError, match="not supported yet"):
            load_model(d)


def test_missing_tensor(tmp_path, tiny):
    key = "model.layers.1.mlp.up_proj.weight"
    d = clone(tiny("qwen3_5"), tmp_path / "c")
    edit_tensors(d, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=re.escape(repr(key))):
        load_model(d)


def test_missing_lm_head_when_untied(tmp_path, tiny):
    d = clone(tiny("llama"), tmp_path / "c")
    edit_tensors(d, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=re.escape("'lm_head.weight'")):
        load_model(d)


@pytest.mark.parametrize("name,key,shape", [
    ("qwen3_5", "model.layers.3.self_attn.k_proj.weight", (48, 64)),
    ("qwen3_5", "model.layers.0.linear_attn.conv1d.weight", (96, 1, 3)),
    ("llama", "model.embed_tokens.weight", (97, 64)),
    ("qwen3_next", "model.layers.0.linear_attn.in_proj_qkvz.weight", (156, 64)),
    ("qwen3_next", "model.layers.1.linear_attn.in_proj_qkvz.weight", (160, 66)),
    ("qwen3_next", "model.layers.2.linear_attn.in_proj_ba.weight", (8,)),
], ids=["attn-k", "conv1d", "embed", "qwen3_next-qkvz-rows", "qwen3_next-qkvz-cols", "qwen3_next-ba-1d"])
def test_wrong_shape(tmp_path, tiny, name, key, shape):
    d = clone(tiny(name), tmp_path / "c")
    original = tuple(load_file(tiny(name) / SINGLE)[key].shape)
    assert original != shape
    edit_tensors(d, lambda t: t.update({key: torch.zeros(shape)}))
    with pytest.raises(CheckpointError) as err:
        load_model(d)
    msg = str(err.value)
    assert repr(key) in msg and str(shape) in msg and str(original) in msg, msg


@pytest.mark.parametrize("key", ["model.layers.0.mlp.extra_proj.weight", "transformer.h.0.weight"])
def test_unexpected_tensor(tmp_path, tiny, key):
    d = clone(tiny("qwen3_5"), tmp_path / "c")
    edit_tensors(d, lambda t: t.update({key: torch.zeros(4, 4)}))
    with pytest.raises(CheckpointError, match=re.escape(repr(key))):
        load_model(d)


def test_pickled_weights_only(tmp_path, tiny):
    d = tmp_path / "c"
    d.mkdir()
    shutil.copy(tiny("llama") / "config.json", d / "config.json")
    torch.save({"lm_head.weight": torch.zeros(2, 2)}, d / "pytorch_model.bin")
    with pytest.raises((FileNotFoundError, CheckpointError), match="safetensors only"):
        load_model(d)


def test_no_weights_at_all(tmp_path, tiny):
    d = tmp_path / "c"
    d.mkdir()
    shutil.copy(tiny("llama") / "config.json", d / "config.json")
    with pytest.raises(FileNotFoundError, match=re.escape(SINGLE)):
        load_model(d)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        flare.load_model(tmp_path / "does-not-exist")


def test_missing_config_json(tmp_path, tiny):
    d = clone(tiny("llama"), tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(d)


def test_invalid_config_json(tmp_path, tiny):
    d = clone(tiny("llama"), tmp_path / "c")
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(d)


def test_config_missing_required_field(tmp_path, tiny):
    d = clone(tiny("llama"), tmp_path / "c")
    edit_config(d, lambda c: c.pop("hidden_size"))
    with pytest.raises(ConfigError, match="hidden_size"):
        load_model(d)


@pytest.mark.parametrize("field,value", [
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                         "original_max_position_embeddings": 1024}),
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
])
def test_unsupported_rope_type(tmp_path, tiny, field, value):
    d = clone(tiny("llama"), tmp_path / "c")

    def edit(c):
        c.pop("rope_parameters", None)
        c[field] = value

    edit_config(d, edit)
    kind = value.get("rope_type", value.get("type"))
    with pytest.raises(ConfigError, match=f"rope_type '{kind}'"):
        load_model(d)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(layer_types=c["layer_types"][:-1]), "layer_types has 3 entries"),
    (lambda c: c.update(layer_types=["full_attention", "sliding_attention"] * 2), "sliding_attention"),
    (lambda c: c.update(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (lambda c: c.update(linear_num_value_heads=3), "linear_num_value_heads"),
], ids=["layer-count", "sliding-window", "gqa", "linear-heads"])
def test_inconsistent_config(tmp_path, tiny, edit, match):
    d = clone(tiny("qwen3_5"), tmp_path / "c")
    edit_config(d, edit)
    with pytest.raises(ConfigError, match=match):
        load_model(d)


def test_qwen3_sliding_window_rejected(tmp_path):
    """Qwen3 with sliding-window layers would be computed wrongly as full attention: it must not load."""
    d = save_tiny_checkpoint(tmp_path / "c", "qwen3", 0, tokenizer=False, use_sliding_window=True,
                             max_window_layers=2, sliding_window=16)
    with pytest.raises(ConfigError, match="sliding_attention"):
        load_model(d)


# --------------------------------------------------------------------------------- 6. ModelConfig round trip
@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_next", "llama", "qwen3", "qwen3_5_tied"])
def test_config_round_trip_keeps_every_field(tiny, name):
    original = read_json(tiny(name) / "config.json")
    cfg = ModelConfig.from_file(tiny(name))
    out = cfg.to_hf_dict()
    assert out == original
    assert "flare" not in out and cfg.mask_token_id is None
    assert cfg.vocab_size == original["vocab_size"] and cfg.hidden_size == original["hidden_size"]
    assert cfg.num_key_value_heads == original["num_key_value_heads"]
    assert cfg.tie_word_embeddings == original["tie_word_embeddings"]
    assert cfg.rms_norm_eps == original["rms_norm_eps"]
    assert cfg.rope_theta == original["rope_parameters"]["rope_theta"]
    factor = original["rope_parameters"].get("partial_rotary_factor", 1.0)
    assert cfg.rotary_dim == int(original["head_dim"] * factor)
    if "layer_types" in original:
        assert cfg.layer_types == original["layer_types"]
    else:
        assert cfg.layer_types == [FULL_ATTENTION] * original["num_hidden_layers"]
    # to_hf_dict hands out a copy: editing it leaves the config alone.
    out["vocab_size"] = 1
    assert cfg.to_hf_dict()["vocab_size"] == original["vocab_size"]


def test_multimodal_config_round_trip(tmp_path, tiny):
    mm = to_multimodal_layout(tiny("qwen3_5"), tmp_path / "mm")
    original = read_json(mm / "config.json")
    cfg = ModelConfig.from_file(mm / "config.json")
    assert cfg.to_hf_dict() == original
    assert cfg.hidden_size == original["text_config"]["hidden_size"]
    assert cfg.eos_token_id == original["text_config"]["eos_token_id"]


def test_mask_token_id_round_trip(tmp_path, tiny):
    src = tiny("qwen3_5")
    original = read_json(src / "config.json")
    cfg = ModelConfig.from_file(src)
    cfg.mask_token_id = 7
    cfg.save(tmp_path)
    written = read_json(tmp_path / "config.json")
    assert written["flare"] == {"mask_token_id": 7}
    assert {k: v for k, v in written.items() if k != "flare"} == original
    assert "flare" not in cfg.hf_config  # saving did not mutate the kept original
    assert ModelConfig.from_file(tmp_path).mask_token_id == 7

    # Through save_model / load_model too; transformers still reads the config with the extra block.
    import transformers as tf

    model = load_model(src)
    model.config.mask_token_id = 5
    save_model(model, tmp_path / "m")
    assert load_model(tmp_path / "m").config.mask_token_id == 5
    assert tf.AutoConfig.from_pretrained(tmp_path / "m").vocab_size == VOCAB


@pytest.mark.parametrize("mask", [VOCAB, VOCAB + 10, -1])
def test_mask_token_id_outside_vocab(tmp_path, tiny, mask):
    cfg = ModelConfig.from_file(tiny("qwen3_5"))
    with pytest.raises(ConfigError, match="mask_token_id"):
        dataclasses.replace(cfg, mask_token_id=mask)
    d = clone(tiny("qwen3_5"), tmp_path / "c")
    edit_config(d, lambda c: c.update(flare={"mask_token_id": mask}))
    with pytest.raises(ConfigError, match=f"mask_token_id {mask}"):
        load_model(d)
    dataclasses.replace(cfg, mask_token_id=VOCAB - 1)  # the last row is fine


# ------------------------------------------------------------------------------------------------ 7. dtype
@pytest.mark.parametrize("name", ["qwen3_5_tied", "qwen3_next", "llama"])
def test_bf16_load(tiny, reference, name):
    fp32, _ = reference(name)
    model = flare.load_model(tiny(name), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.dtype == torch.bfloat16
    # The cast happened (bf16 parameters are not fp32 ones relabelled), and is a plain rounding of each weight.
    for (key, p), (key32, p32) in zip(model.state_dict().items(), fp32.state_dict().items()):
        assert key == key32 and torch.equal(p, p32.to(torch.bfloat16)), key
    assert not torch.equal(model.model.embed_tokens.weight.float(), fp32.model.embed_tokens.weight)
    ids = prompt(63, seed=6)
    got, want = flare_logits(model, ids), flare_logits(fp32, ids)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert torch.isfinite(got).all()
    # Loose: bf16 round-off is amplified by the random stack on a few tokens, so bound the mean and the argmax.
    scale = max(want.abs().max().item(), 1.0)
    mean_err = (got.float() - want).abs().mean().item()
    assert mean_err <= 0.02 * scale, f"bf16 vs fp32: mean |diff| {mean_err:.3e} (logit scale {scale:.3e})"
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"bf16 and fp32 agree on the argmax of only {agree:.0%} of the rows"


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["qwen3_5_tied", "llama_tied"])
def test_tied_embeddings_stay_tied(tiny, name, dtype):
    model = load_model(tiny(name), dtype=dtype)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.lm_head.weight.is_meta
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # one parameter, counted once
    ids = prompt(1, seed=8)
    hidden = model.hidden_states(ids)
    assert torch.equal(model(ids), hidden @ model.model.embed_tokens.weight.T)


def test_untied_model_has_separate_head(reference):
    model, ref = reference("qwen3_5")
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
