"""Import a llama.cpp GGUF file as a Hugging Face checkpoint directory (flare and transformers both load it).

Written: config.json (LlamaForCausalLM), model.safetensors (dequantized, cast to the asked dtype), tokenizer.json,
tokenizer_config.json (special tokens, chat template), generation_config.json. Read: architecture ``llama`` (dense,
plain RoPE; llama.cpp permutes q/k rows per head to make rotary pairs adjacent: they go back to HF's rotate-half
order, as in transformers' GGUF loader); F32, F16, BF16 and ``BLOCK_TYPES`` tensors (``gguf.quants.dequantize``);
tokenizer ``gpt2`` (byte-level BPE) with the ``PRE`` pre-tokenizers (llama.cpp's splits), CONTROL tokens as special
and USER_DEFINED ones as plain added tokens. The header is parsed here, not by ``gguf.GGUFReader``, so that bad
files are ``GGUFError``s naming the file and the problem. Nothing is written until the file is read and checked;
the directory is then written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from flare.checkpoint import CheckpointError
from flare.checkpoint.io import write_tensors
from flare.checkpoint.keymaps import expected_hf_shapes
from flare.config import ConfigError, ModelConfig
from flare.model import FlareModel

GGUF_MAGIC = b"GGUF"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# ggml type ids read (gguf.GGMLQuantizationType): plain floats (numpy dtype of their bits), then block formats.
FLOAT_TYPES = {0: "<f4", 1: "<f2", 30: "<u2"}
BLOCK_TYPES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K",
               13: "Q5_K", 14: "Q6_K"}
SUPPORTED = "F32, F16, BF16, " + ", ".join(BLOCK_TYPES.values())
# Metadata value types of fixed size (struct format); 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4  # tokenizer.ggml.token_type values
# A tensor of the file: name, dims (ggml order: the row length first), ggml type id, byte offset, byte count.
TensorInfo = NamedTuple("TensorInfo", [("name", str), ("dims", tuple), ("kind", int), ("start", int), ("nbytes", int)])

# tokenizer.ggml.pre -> (split, ignore_merges, add_bos default, clean_up_tokenization_spaces), as llama.cpp's
# llama-vocab.cpp sets them. "gpt2": GPT-2's regex; "digits": each digit alone, then GPT-2's; "llama3": Llama 3's.
PRE = {"gpt-2": ("gpt2", False, False, True), "smollm": ("digits", False, False, False),
       **dict.fromkeys(("starcoder", "refact"), ("digits", False, False, True)),
       **dict.fromkeys(("llama3", "llama-v3", "llama-bpe"), ("llama3", True, True, True)),
       **dict.fromkeys(("smaug-bpe", "dbrx"), ("llama3", False, False, True))}
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# GGUF tensor names -> HF names.
LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
         "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}


class GGUFError(CheckpointError):
    """A GGUF file that cannot be imported: unreadable, truncated, or describing what flare does not implement."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ModuleNotFoundError("importing a GGUF file needs the gguf package: pip install 'flare-lm[gguf]' "
                                  "(or: pip install gguf)") from None
    return gguf


class _Reader:
    """Little-endian reads from the start of the mapped file; running past its end is a GGUFError."""

    def __init__(self, path: Path):
        self.path, self.pos, self.size = path, 0, path.stat().st_size
        self.buf = np.memmap(path, dtype=np.uint8, mode="r") if self.size else np.zeros(0, np.uint8)

    def take(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated: the header runs past the end of the file ({self.size} bytes)")
        self.pos += n
        return self.buf[self.pos - n : self.pos].tobytes()

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == 8:
            try:
                return self.take(self.unpack("<Q")).decode("utf-8")
            except UnicodeDecodeError as e:
                raise GGUFError(f"{self.path}: a string ending at byte {self.pos} is not UTF-8 ({e})") from None
        if kind == 9:
            sub, n = self.unpack("<I"), self.unpack("<Q")
            if sub in _SCALARS and sub != 7:
                dtype = np.dtype(_SCALARS[sub])
                return np.frombuffer(self.take(n * dtype.itemsize), dtype).tolist()
            return [self.value(sub) for _ in range(n)]
        raise GGUFError(f"{self.path}: unknown metadata value type {kind} before byte {self.pos}")


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[TensorInfo], np.ndarray]:
    """The metadata, the tensor table (each tensor of a readable type and inside the file) and the mapped bytes of
    a GGUF v2/v3 file."""
    gguf, path = _gguf(), Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    r = _Reader(path)
    if r.take(4) != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    version = r.unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (little-endian v2 and v3 are)")
    n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
    meta = {r.value(8): r.value(r.unpack("<I")) for _ in range(n_kv)}
    # per tensor: name, dims, type, offset in the data section
    table = [(r.value(8), tuple(r.unpack("<Q") for _ in range(r.unpack("<I"))), r.unpack("<I"), r.unpack("<Q"))
             for _ in range(n_tensors)]
    align = int(meta.get("general.alignment", 32))
    if align < 1 or align & (align - 1):
        raise GGUFError(f"{path}: general.alignment {align} is not a power of two")
    data, tensors = -(-r.pos // align) * align, []
    for name, dims, kind, offset in table:
        if kind not in FLOAT_TYPES and kind not in BLOCK_TYPES:
            known = {int(t): t.name for t in gguf.GGMLQuantizationType}.get(kind, "unknown")
            raise GGUFError(f"{path}: tensor {name!r} has ggml type {kind} ({known}), which the importer cannot "
                            f"read; it reads {SUPPORTED}")
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        if not dims or dims[0] % block:
            raise GGUFError(f"{path}: tensor {name!r} of shape {dims} does not split into blocks of {block}")
        start, nbytes = data + offset, int(np.prod(dims)) // block * block_bytes
        if start + nbytes > r.size:
            raise GGUFError(f"{path}: truncated: tensor {name!r} ends at byte {start + nbytes} of {r.size}")
        tensors.append(TensorInfo(name, dims, kind, start, nbytes))
    if int(meta.get("split.count", 1)) > 1:
        raise GGUFError(f"{path}: one part of a split GGUF; merge the parts first (llama-gguf-split --merge)")
    return meta, tensors, r.buf


def dequantize(buf: np.ndarray, t: TensorInfo) -> torch.Tensor:
    """One tensor as float32, in torch's dimension order."""
    raw = buf[t.start : t.start + t.nbytes]
    if t.kind == 30:  # bf16: the top half of a float32
        values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif t.kind in FLOAT_TYPES:
        values = raw.view(FLOAT_TYPES[t.kind]).astype(np.float32)
    else:
        gguf, rows = _gguf(), int(np.prod(t.dims)) // t.dims[0]
        values = gguf.quants.dequantize(np.ascontiguousarray(raw.reshape(rows, -1)), gguf.GGMLQuantizationType(t.kind))
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(tuple(reversed(t.dims))))


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row order for q/k (rotary pairs interleaved) -> HF's rotate-half order."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_config(meta: dict[str, Any], tensors: dict[str, TensorInfo], path: Path, dtype: str) -> dict[str, Any]:
    """The config.json of the LlamaForCausalLM that the metadata describes."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; the GGUF import reads 'llama' "
                        "(dense Llama-style models)")

    def get(key: str, default: Any = ...) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is ...:
            raise GGUFError(f"{path}: metadata 'llama.{key}' is missing")
        if isinstance(value, list):  # per-layer values: flare's llama has one per model
            if not value or len(set(value)) != 1:
                raise GGUFError(f"{path}: llama.{key} differs between layers ({value}); flare needs one value")
            value = value[0]
        return value

    f32 = lambda x: float(str(np.float32(x)))  # noqa: E731  (shortest decimal of the float32: 1e-05)
    if get("expert_count", 0):
        raise GGUFError(f"{path}: a mixture-of-experts llama ({get('expert_count')} experts) is not supported")
    if "rope_freqs.weight" in tensors or get("rope.scaling.type", "none") not in ("none", ""):
        raise GGUFError(f"{path}: RoPE scaling (rope_freqs / rope.scaling.type) is not supported; only plain RoPE")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    if get("attention.value_length", head_dim) != head_dim or get("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{path}: key/value/rotary widths differ from the head size {head_dim}; not supported")
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "eot", "eom")}
    eos = [i for i in dict.fromkeys([ids["eos"], ids["eot"], ids["eom"]]) if i is not None]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": tensors["token_embd.weight"].dims[-1] if "token_embd.weight" in tensors else 0,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"), "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim, "max_position_embeddings": get("context_length"),
        "rms_norm_eps": f32(get("attention.layer_norm_rms_epsilon")),
        "rope_parameters": {"rope_type": "default", "rope_theta": f32(get("rope.freq_base", 10000.0))},
        "tie_word_embeddings": "output.weight" not in tensors, "mlp_bias": False, "attention_dropout": 0.0,
        "attention_bias": any(re.search(r"\.attn_(q|k|v|output)\.bias$", n) for n in tensors),
        "bos_token_id": ids["bos"], "pad_token_id": ids["padding"], "dtype": dtype,
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,  # eot/eom too: a chat turn ends there
    }


def hf_tensors(infos: list[TensorInfo], buf: np.ndarray, raw: dict[str, Any], path: Path,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor under its HF name, dequantized, q/k rows in HF order. Names and shapes are checked against
    the config (from the tensor table) before anything is dequantized."""
    try:
        config = ModelConfig.from_hf_dict(raw)
    except ConfigError as e:
        raise GGUFError(f"{path}: {e}") from None
    with torch.device("meta"):
        expected = expected_hf_shapes(FlareModel(config).state_dict(), config)
    names = {}
    for t in infos:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
        hf = TOP.get(t.name) or (f"model.layers.{m[1]}.{LAYER[m[2]]}.{m[3]}" if m and m[2] in LAYER else None)
        if hf not in expected:
            raise GGUFError(f"{path}: tensor {t.name!r} is not part of the dense llama model the metadata describes")
        if tuple(reversed(t.dims)) != expected[hf]:
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {tuple(reversed(t.dims))}, the metadata implies "
                            f"{expected[hf]}")
        names[t.name] = hf
    missing = sorted(set(expected) - set(names.values()))
    if missing:
        raise GGUFError(f"{path}: the file has no tensor for {missing[0]!r} ({len(missing)} missing)")
    out = {}
    for t in infos:
        w, part = dequantize(buf, t), t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if part in ("attn_q", "attn_k"):
            w = unpermute_rope(w, raw["num_attention_heads" if part == "attn_q" else "num_key_value_heads"])
        out[names[t.name]] = w.to(dtype)
    return out


def hf_tokenizer(meta: dict[str, Any], path: Path):
    """(tokenizers.Tokenizer, tokenizer_config.json dict) from the tokenizer.ggml.* metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    for key in ("model", "tokens", "merges"):
        if f"tokenizer.ggml.{key}" not in meta:
            raise GGUFError(f"{path}: tokenizer metadata 'tokenizer.ggml.{key}' is missing")
    if model != "gpt2" or pre not in PRE:
        what = f"tokenizer model {model!r}" if model != "gpt2" else f"pre-tokenizer {pre!r} (tokenizer.ggml.pre)"
        raise GGUFError(f"{path}: {what} is not supported; the import reads tokenizer model 'gpt2' (byte-level "
                        f"BPE) with tokenizer.ggml.pre one of {', '.join(PRE)}")
    split, ignore_merges, add_bos, clean = PRE[pre]
    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(meta["tokenizer.ggml.tokens"])]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if vocab.setdefault(t, i) != i:
            raise GGUFError(f"{path}: token {t!r} appears twice in the vocabulary (ids {vocab[t]} and {i})")
    merges = [(m, m.find(" ", 1)) for m in meta["tokenizer.ggml.merges"]]  # "a b": split at the first space
    if bad := next((m for m, cut in merges if cut < 0), None):
        raise GGUFError(f"{path}: BPE merge {bad!r} is not two tokens separated by a space")
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[:cut], m[cut + 1 :]) for m, cut in merges],
                                   ignore_merges=ignore_merges))
    except Exception as e:  # a merge naming a token the vocabulary lacks
        raise GGUFError(f"{path}: the BPE merges do not fit the vocabulary: {e}") from None
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split != "llama3")
    first = {"digits": pre_tokenizers.Digits(individual_digits=True),
             "llama3": pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated")}.get(split)
    tok.pre_tokenizer = pre_tokenizers.Sequence([first, byte_level]) if first else byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    ids = {name: meta.get(f"tokenizer.ggml.{key}_token_id") for name, key in
           (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"))}
    specials = {name: tokens[i] for name, i in ids.items() if i is not None and 0 <= i < len(tokens)}
    bos, eos = specials.get("bos_token"), specials.get("eos_token")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    post, ends = [processors.ByteLevel(trim_offsets=False)], [t for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    if ends and not any(":" in t for t in ends):  # the template transformers builds (a ':' cannot be spelled in it)
        side = lambda seq, k: [f"{bos}:{k}"] * add_bos + [f"${seq}:{k}"] + [f"{eos}:{k}"] * add_eos  # noqa: E731
        post.append(processors.TemplateProcessing(single=side("A", 0), pair=side("A", 0) + side("B", 1),
                                                  special_tokens=[(t, vocab[t]) for t in ends]))
    tok.post_processor = processors.Sequence(post)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": add_bos,
              "add_eos_token": add_eos, "clean_up_tokenization_spaces": clean}
    if "llama.context_length" in meta:
        config["model_max_length"] = int(meta["llama.context_length"])
    templates = [{"name": m[1] or "default", "template": v} for k, v in meta.items()
                 if (m := re.fullmatch(r"tokenizer\.chat_template(?:\.(.+))?", k)) and isinstance(v, str)]
    if templates:  # named ones (tool_use, ...) beside the default: HF's list form
        only_default = [t["name"] for t in templates] == ["default"]
        config["chat_template"] = templates[0]["template"] if only_default else templates
    return tok, config


def convert_command(src: str, dst: str, dtype: str | None, mask_token_id: int | None) -> bool:
    """``flare convert`` on a GGUF file (any file: checkpoints are directories): import it and say what comes next.
    False, having done nothing, for a directory."""
    gguf = src.lower().endswith(".gguf") or os.path.isfile(src)
    if (mask_token_id if gguf else dtype) is not None:
        raise ValueError("--dtype applies to GGUF imports only, --mask-token-id to checkpoint directories only")
    if gguf:
        import_gguf(src, dst, dtype or "float32")
        print(f"wrote checkpoint {dst} from {src}; add the [MASK] row with: flare convert --from {dst} --to FLARE_DIR")
    return gguf


def import_gguf(src: str | Path, dst: str | Path, dtype: str | torch.dtype = torch.float32) -> Path:
    """Write the Hugging Face checkpoint of the GGUF file ``src`` to the new (or empty) directory ``dst``.

    Everything is read and checked before anything is written; ``dst`` appears complete or not at all."""
    src, dst = Path(src), Path(dst)
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not {'empty' if dst.is_dir() else 'a directory'}")
    meta, infos, buf = read_gguf(src)
    raw = hf_config(meta, {t.name: t for t in infos}, src, str(dtype).removeprefix("torch."))
    tokenizer, tok_config = hf_tokenizer(meta, src)
    tensors = hf_tensors(infos, buf, raw, src, dtype)
    if (n := tokenizer.get_vocab_size(with_added_tokens=True)) > raw["vocab_size"]:
        raise GGUFError(f"{src}: the tokenizer has {n} tokens but the embedding only {raw['vocab_size']} rows")
    generation = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw[k] is not None}

    created = [p for p in [dst.parent, *dst.parent.parents] if not p.exists()]  # deepest first
    tmp = dst.parent / f".tmp-{dst.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write_tensors(tensors, tmp)
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if dst.exists():
            dst.rmdir()  # empty, checked above
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:
            if p.exists() and not any(p.iterdir()):
                p.rmdir()
        raise
    return dst
