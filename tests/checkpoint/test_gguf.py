"""GGUF import (flare.checkpoint.gguf): a tiny seeded Llama and byte-level BPE tokenizer written to GGUF files the
way llama.cpp's converter writes them (q/k rows permuted, llama.* and tokenizer.ggml.* metadata), imported, and
checked against transformers' own GGUF loading of the same file: weights, logits, greedy tokens, tokenization,
chat template. Bad files are clear errors that leave nothing behind; `flare convert` imports, then converts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'flare-lm[gguf]')")

import flare  # noqa: E402
from flare.checkpoint import stored_dtype  # noqa: E402
from flare.checkpoint.gguf import GGUFError, import_gguf  # noqa: E402
from flare.cli import main  # noqa: E402
from flare.data import ChatTokenizer  # noqa: E402
from flare.data.template import render_template  # noqa: E402
from flare.decoding import SamplingParams  # noqa: E402
from flare.engine import decode  # noqa: E402
from flare.testing.checkpoints import hf_model  # noqa: E402

Q = gguf.GGMLQuantizationType
VOCAB = 384  # model rows: the tokenizer's tokens, then [PAD] rows as llama.cpp pads them
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog, 12345 times in 2024.",
    "Numbers: 3.14159, 2718 and 100000; café, naïve, Zürich, résumé, über, 東京.",
    "def add(x, y):\n    return x + y  # it's done\n\n\tTabs and  double  spaces.",
    "<|im_start|>user\nWhat's 17 + 25?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>",
] * 20
STRINGS = ["Hello world", "12345 + 678 = 13023 in 2024", "  two  spaces\nnew line\n\n\ttab ",
           "café naïve Zürich 東京", "<|im_start|>user\nhi<|im_end|>", "think: <think>ok</think> it's"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What's 2+2?"}]
# llama.cpp's tensor names for a llama block.
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def bpe_tokenizer(pre: str):
    """A byte-level BPE trained on CORPUS with the pre-tokenizer llama.cpp's ``pre`` names: the original HF
    tokenizer the GGUF file is made from."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = {
        "gpt-2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+"), "isolated"), byte_level]),
    }[pre]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens(["<think>", "</think>"])  # user-defined, not special
    assert tok.get_vocab_size() <= VOCAB
    return tok


def tokenizer_metadata(tok, pre: str, add_bos: bool) -> dict:
    """tokenizer.ggml.* as llama.cpp's converter writes them for a byte-level BPE."""
    vocab = {i: t for t, i in tok.get_vocab().items()}
    added = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    tokens = [vocab.get(i, f"[PAD{i}]") for i in range(VOCAB)]
    types = [5 if i not in vocab else 3 if added.get(t) else 4 if t in added else 1 for i, t in enumerate(tokens)]
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return dict(pre=pre, tokens=tokens, types=types, merges=merges, add_bos=add_bos,
                bos=tok.token_to_id("<|im_start|>"), eos=tok.token_to_id("<|im_end|>"),
                pad=tok.token_to_id("<|endoftext|>"))


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's rotary halves interleaved."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, tok: dict | None, qtype=Q.F32, *, arch: str = "llama", tensor=None) -> Path:
    """``model`` as llama.cpp writes a llama: 2-D weights in ``qtype`` (norms stay F32); ``tensor(name, w)`` may
    return (array, type) to override one."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(int(qtype))
    if qtype not in (Q.F32, Q.F16, Q.BF16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tok is not None:
        w.add_tokenizer_model(tok.get("model", "gpt2"))
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        w.add_bos_token_id(tok["bos"])
        w.add_eos_token_id(tok["eos"])
        w.add_pad_token_id(tok["pad"])
        w.add_add_bos_token(tok["add_bos"])
        w.add_chat_template(TEMPLATE)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.float().numpy()
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            g = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm"}.get(name, "output")
        else:
            _, _, i, *mod, _ = name.split(".")
            g = f"blk.{i}.{GGUF_NAMES['.'.join(mod)]}"
            if g.endswith(("attn_q", "attn_k")):
                t = permute(t, cfg.num_attention_heads if g.endswith("q") else cfg.num_key_value_heads)
        g += ".weight"
        data, kind = (t, Q.F32) if t.ndim == 1 else (t, qtype)
        if tensor is not None:
            data, kind = tensor(g, t) or (data, kind)
        if kind == Q.F32:
            w.add_tensor(g, data.astype(np.float32))
        elif kind == Q.F16:
            w.add_tensor(g, data.astype(np.float16))
        else:
            w.add_tensor(g, data if data.dtype == np.uint8 else gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def bpe():
    """pre-tokenizer name -> the original tokenizer (trained once per module)."""
    return {pre: bpe_tokenizer(pre) for pre in ("smollm", "gpt-2", "llama-bpe")}


@pytest.fixture(scope="module")
def llama():
    return hf_model("llama", seed=5, vocab_size=VOCAB, num_hidden_layers=2)


def hf_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def prompt(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(model(torch.tensor([out]), use_cache=False).logits[0, -1].argmax()))
    return out[len(ids):]


def assert_matches_transformers(out: Path, file: Path, atol: float = 1e-4):
    """Weights equal to transformers' GGUF loading of ``file``; logits within ``atol``; 8 greedy tokens equal."""
    from transformers import AutoModelForCausalLM

    ref = hf_gguf(file)
    mine = AutoModelForCausalLM.from_pretrained(out).eval()  # transformers reads the directory too
    ref_state = ref.state_dict()
    for key, value in mine.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=0, atol=0, msg=key)
    model, ids = flare.load_model(out), prompt()
    with torch.no_grad():
        expected = ref(ids, use_cache=False).logits
        assert (model(ids) - expected).abs().max().item() <= atol
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    assert decode(model, [ids[0].tolist()], params).token_ids[0] == hf_greedy(ref, ids[0].tolist(), 8)
    return model


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_import_matches_transformers(tmp_path, llama, bpe, qtype):
    tok = tokenizer_metadata(bpe["smollm"], "smollm", add_bos=False)
    file = write_gguf(tmp_path / f"tiny-{qtype}.gguf", llama, tok, Q[qtype])
    out = import_gguf(file, tmp_path / "out")
    model = assert_matches_transformers(out, file)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is False and config["eos_token_id"] == tok["eos"]
    assert stored_dtype(out) == torch.float32
    if qtype == "F32":  # exact weights: the import is the original model, q/k rows back in HF order
        with torch.no_grad():
            torch.testing.assert_close(model(prompt()), llama(prompt(), use_cache=False).logits, rtol=0, atol=1e-5)


def test_tied_embeddings_and_dtype(tmp_path, bpe):
    model = hf_model("llama", seed=6, vocab_size=VOCAB, num_hidden_layers=2, tie_word_embeddings=True)
    tok = tokenizer_metadata(bpe["smollm"], "smollm", add_bos=False)
    file = write_gguf(tmp_path / "tied.gguf", model, tok, Q.Q8_0)
    out = import_gguf(file, tmp_path / "fp32")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert_matches_transformers(out, file)
    half = import_gguf(file, tmp_path / "bf16", dtype="bfloat16")
    assert stored_dtype(half) == torch.bfloat16
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    full, low = flare.load_model(out).state_dict(), flare.load_model(half).state_dict()
    for key, value in full.items():
        assert torch.equal(low[key], value.to(torch.bfloat16)), key


# The fp16 scale fields of each k-quant block (byte offsets), set to small finite values in random blocks.
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def test_k_quants(tmp_path, bpe):
    """Each k-quant in one file (random blocks with sane scales), against transformers' dequantization."""
    model = hf_model("llama", seed=7, vocab_size=VOCAB, num_hidden_layers=1, hidden_size=256, intermediate_size=256,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    rng = np.random.default_rng(0)
    kinds = iter([Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K] * 3)

    def k_blocks(name, w):
        if w.ndim == 1:
            return None
        kind = next(kinds)
        size, nbytes = gguf.GGML_QUANT_SIZES[kind]
        blocks = rng.integers(0, 256, (w.shape[0], w.shape[1] // size, nbytes), dtype=np.uint8)
        for at in K_SCALES[kind]:
            blocks[..., at:at + 2] = np.array([2.0 ** -14], np.float16).view(np.uint8)
        return blocks.reshape(w.shape[0], -1), kind

    tok = tokenizer_metadata(bpe["smollm"], "smollm", add_bos=False)
    file = write_gguf(tmp_path / "k.gguf", model, tok, Q.Q4_K, tensor=k_blocks)
    assert_matches_transformers(import_gguf(file, tmp_path / "out"), file)


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "llama-bpe"])
def test_tokenizer_and_chat_template(tmp_path, llama, bpe, pre):
    original = bpe[pre]
    meta = tokenizer_metadata(original, pre, add_bos=pre == "llama-bpe")
    file = write_gguf(tmp_path / "tok.gguf", llama, meta, Q.F16)
    out = import_gguf(file, tmp_path / "out")
    from transformers import AutoTokenizer

    theirs, reread, mine = hf_tokenizer(file), AutoTokenizer.from_pretrained(out), ChatTokenizer.from_dir(out)
    for text in STRINGS:
        ids = mine.encode(text)
        assert ids == original.encode(text, add_special_tokens=False).ids, text
        assert ids == theirs(text, add_special_tokens=False).input_ids, text
        assert reread(text).input_ids == theirs(text).input_ids, text  # bos where add_bos_token says
        for skip in (True, False):
            assert mine.decode(ids, skip) == original.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip)
    if pre == "llama-bpe":  # llama.cpp's default for Llama 3 vocabularies, and the file says so too
        assert reread(STRINGS[0]).input_ids[0] == meta["bos"]
    assert mine.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert mine.special_strings == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    assert mine.chat_template == TEMPLATE
    text = render_template(mine.chat_template, MESSAGES, add_generation_prompt=True, **mine.template_variables)
    assert text == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == reread.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|><|im_start|>system\nBe brief.<|im_end|>\n")


def gone(tmp_path: Path, dst: Path) -> bool:
    """Nothing left: no output directory, no temporary one, no parent created for it."""
    return not dst.exists() and not dst.parent.exists() and not list(tmp_path.rglob(".tmp-*"))


def patch_tensor_type(file: Path, kind: int) -> None:
    reader = gguf.GGUFReader(file, "r+")  # the tensor table is memory-mapped: write the first tensor's type
    reader.tensors[0].field.parts[4][0] = kind
    reader.data.flush()


BAD = {
    "unknown tensor type": (lambda f: patch_tensor_type(f, 99), r"ggml type 99 \(unknown\).*it reads F32"),
    "unread tensor type": (lambda f: patch_tensor_type(f, int(Q.IQ4_NL)), r"ggml type 20 \(IQ4_NL\)"),
    "truncated data": (lambda f: os.truncate(f, f.stat().st_size - 1000), "truncated: tensor .* ends at byte"),
    "truncated header": (lambda f: os.truncate(f, 300), "truncated: the header runs past the end"),
    "not gguf": (lambda f: f.write_bytes(b"PK\x03\x04" + bytes(100)), "not a GGUF file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files(tmp_path, llama, bpe, case):
    file = write_gguf(tmp_path / "bad.gguf", llama, tokenizer_metadata(bpe["gpt-2"], "gpt-2", False))
    spoil, message = BAD[case]
    spoil(file)
    dst = tmp_path / "sub" / "out"
    with pytest.raises(GGUFError, match=message) as err:
        import_gguf(file, dst)
    assert str(file) in str(err.value) and gone(tmp_path, dst)


@pytest.mark.parametrize("case, message", [
    ("arch", "architecture 'gpt2' is not supported"),
    ("no tokenizer", "tokenizer metadata 'tokenizer.ggml.model' is missing"),
    ("spm", "tokenizer model 'llama' is not supported"),
    ("pre", r"pre-tokenizer 'qwen2' \(tokenizer.ggml.pre\) is not supported"),
])
def test_unsupported_metadata(tmp_path, llama, bpe, case, message):
    tok = tokenizer_metadata(bpe["gpt-2"], "gpt-2", False)
    tok = {"no tokenizer": None, "spm": {**tok, "model": "llama"}, "pre": {**tok, "pre": "qwen2"}}.get(case, tok)
    file = write_gguf(tmp_path / "x.gguf", llama, tok, arch="gpt2" if case == "arch" else "llama")
    dst = tmp_path / "sub" / "out"
    with pytest.raises(GGUFError, match=message):
        import_gguf(file, dst)
    assert gone(tmp_path, dst)


def test_outputs_are_atomic(tmp_path, llama, bpe, monkeypatch):
    file = write_gguf(tmp_path / "ok.gguf", llama, tokenizer_metadata(bpe["gpt-2"], "gpt-2", False))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        import_gguf(file, taken)
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    # A failure while writing (disk full, ...) removes the partial directory and the parents made for it.
    import flare.checkpoint.gguf as module

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(module, "write_tensors", fail)
    dst = tmp_path / "a" / "b" / "out"
    with pytest.raises(OSError, match="disk full"):
        import_gguf(file, dst)
    assert not (tmp_path / "a").exists() and not list(tmp_path.rglob(".tmp-*"))
    monkeypatch.undo()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert import_gguf(file, empty) == empty and (empty / "model.safetensors").exists()


def test_missing_gguf_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'flare-lm\[gguf\]'"):
        import_gguf(tmp_path / "x.gguf", tmp_path / "out")
    assert main(["convert", "--from", str(tmp_path / "x.gguf"), "--to", str(tmp_path / "out")]) == 2
    assert "pip install 'flare-lm[gguf]'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cli_imports_then_converts(tmp_path, llama, bpe, capsys):
    file = write_gguf(tmp_path / "m.gguf", llama, tokenizer_metadata(bpe["smollm"], "smollm", False), Q.Q8_0)
    out, final = tmp_path / "out", tmp_path / "flare_out"
    run = subprocess.run([sys.executable, "-m", "flare", "convert", "--from", str(file), "--to", str(out)],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert f"flare convert --from {out} --to FLARE_DIR" in run.stdout
    before = flare.load_model(out)
    assert before.config.family == "llama" and before.config.mask_token_id is None
    assert main(["convert", "--from", str(out), "--to", str(final)]) == 0
    assert "wrote FLARE checkpoint" in capsys.readouterr().out
    after = flare.load_model(final)
    assert after.config.mask_token_id is not None and ChatTokenizer.from_dir(final).chat_template == TEMPLATE
    ids = prompt()
    with torch.no_grad():
        torch.testing.assert_close(after(ids)[..., :VOCAB], before(ids), rtol=0, atol=1e-6)
    # Flags of the other kind of conversion are errors, and leave nothing behind.
    assert main(["convert", "--from", str(file), "--to", str(tmp_path / "x"), "--mask-token-id", "3"]) == 2
    assert main(["convert", "--from", str(out), "--to", str(tmp_path / "y"), "--dtype", "float16"]) == 2
    assert "--dtype applies to GGUF imports only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
