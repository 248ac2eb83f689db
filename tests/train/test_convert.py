"""`flare convert`: AR logits unchanged on the original vocabulary, the [MASK] id recorded in config.json, the
tokenizer copied; repeated or wrong conversions are clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import flare
from flare.cli import main
from flare.data import ChatTokenizer
from flare.testing.checkpoints import save_tiny_checkpoint
from flare.testing.toy import toy_ar_checkpoint
from flare.train.convert import convert

# (how the [MASK] row is found, builder of the AR checkpoint)
CASES = {
    # The char ChatML tokenizer names <|mask|> but can never emit it: that row is used as is.
    "named": lambda path: toy_ar_checkpoint(path, seed=3),
    # The embedding has rows past the tokenizer's vocabulary: the first spare one.
    "spare": lambda path: save_tiny_checkpoint(path, "llama", seed=3),
    # The tokenizer uses every row: one is added (mean input embedding; untied, then tied head).
    "added": lambda path: save_tiny_checkpoint(path, "qwen3_5", seed=3, vocab_size=64),
    "added_tied": lambda path: save_tiny_checkpoint(path, "qwen3_5", seed=3, vocab_size=64, tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_convert_keeps_causal_logits(tmp_path, case):
    src = CASES[case](tmp_path / "ar")
    dst = tmp_path / "flare"
    mask_id = convert(src, dst)
    before, after = flare.load_model(src), flare.load_model(dst)
    tok = ChatTokenizer.from_dir(src)
    v_src = before.config.vocab_size

    expected_vocab = v_src + 1 if case.startswith("added") else v_src
    assert after.config.vocab_size == expected_vocab and after.config.mask_token_id == mask_id
    if case == "named":
        assert mask_id == tok.token_id("<|mask|>")
    elif case == "spare":
        assert mask_id == tok.max_token_id + 1 < v_src
    else:
        assert mask_id == v_src
        emb = after.model.embed_tokens.weight
        torch.testing.assert_close(emb[mask_id], before.model.embed_tokens.weight.mean(0))
        assert after.config.tie_word_embeddings == (case == "added_tied")
        if case == "added_tied":
            assert after.lm_head.weight is after.model.embed_tokens.weight

    # config.json records the mask row (and the new size) for any reader.
    saved = json.loads((dst / "config.json").read_text())
    assert saved["flare"] == {"mask_token_id": mask_id}
    assert saved["vocab_size"] == expected_vocab
    # The tokenizer files come along unchanged.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()

    # Causal logits on the original vocabulary are unchanged; [MASK] is never predicted.
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.max_token_id + 1, (2, 17), generator=g)
    ids[ids == mask_id] = 0
    with torch.no_grad():
        old, new = before(ids), after(ids)
    keep = torch.ones(v_src, dtype=torch.bool)
    if mask_id < v_src:
        keep[mask_id] = False  # a named or spare row had a finite logit before; now it is -inf
    torch.testing.assert_close(new[..., :v_src][..., keep], old[..., keep], rtol=0, atol=1e-6)
    assert torch.isneginf(new[..., mask_id]).all()
    # And the converted checkpoint trains-ready: the mask id is what the objective will use.
    assert flare.load_model(dst).config.mask_token_id == mask_id


def test_convert_errors(tmp_path, capsys):
    src = toy_ar_checkpoint(tmp_path / "ar", seed=3)
    dst = tmp_path / "flare"
    assert main(["convert", "--from", str(src), "--to", str(dst)]) == 0
    assert "wrote FLARE checkpoint" in capsys.readouterr().out
    listing = sorted(p.name for p in dst.iterdir())

    # Twice into the same directory.
    with pytest.raises(FileExistsError, match="not empty"):
        convert(src, dst)
    assert main(["convert", "--from", str(src), "--to", str(dst)]) == 2
    assert f"{dst} exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in dst.iterdir()) == listing  # untouched

    # Into any non-empty directory, or onto a file.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        convert(src, other)
    assert (other / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        convert(src, a_file)
    assert main(["convert", "--from", str(src), "--to", str(a_file)]) == 2
    capsys.readouterr()

    # An already converted checkpoint.
    with pytest.raises(ValueError, match="already a FLARE checkpoint"):
        convert(dst, tmp_path / "again")
    assert main(["convert", "--from", str(dst), "--to", str(tmp_path / "again2")]) == 2
    assert "already a FLARE checkpoint" in capsys.readouterr().err

    # A missing source, an out-of-range explicit mask id.
    with pytest.raises(FileNotFoundError, match="missing"):
        convert(tmp_path / "missing", tmp_path / "x")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        convert(src, tmp_path / "y", mask_token_id=10_000)

    # An empty existing directory is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(src, empty)
    assert flare.load_model(empty).config.mask_token_id is not None
