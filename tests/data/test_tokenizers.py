"""Tokenizer loading, the character-level ChatML tokenizer, and the choice of the [MASK] row."""

from __future__ import annotations

import json

import pytest

from flare.data import MASK_TOKEN, ChatTokenizer, find_mask_slot, save_char_tokenizer
from flare.data.char_tokenizer import SPECIAL_TOKENS, THINK_TOKENS
from flare.testing.checkpoints import write_char_tokenizer


def test_char_tokenizer_round_trips_and_loads_as_a_plain_tokenizer(char_dir, char_tok):
    text = "What is 47+38?\n<think>\n</think>\\boxed{85}"
    ids = char_tok.encode(text)
    assert char_tok.decode(ids) == text
    from tokenizers import Tokenizer

    plain = Tokenizer.from_file(str(char_dir / "tokenizer.json"))
    assert plain.encode(text, add_special_tokens=False).ids == ids
    assert plain.get_vocab_size(with_added_tokens=True) == char_tok.vocab_size
    # Every ChatML and think token is one id, recognised inside running text.
    for tok in SPECIAL_TOKENS + THINK_TOKENS:
        assert char_tok.encode(f"a{tok}b") == [char_tok.token_id("a"), char_tok.token_id(tok), char_tok.token_id("b")]
    # ChatML specials are special (dropped by decode), think tags are not.
    assert char_tok.decode(char_tok.encode("<|im_start|>x<think>")) == "x<think>"
    assert char_tok.pad_id == char_tok.token_id("<|endoftext|>")


def test_mask_token_is_never_emitted_by_encoding(char_tok):
    mask = char_tok.token_id(MASK_TOKEN)
    assert mask == char_tok.vocab_size - 1
    for text in (MASK_TOKEN, f"x{MASK_TOKEN}y", "<|mask|><|im_end|>", "".join(chr(c) for c in range(1, 200))):
        assert mask not in char_tok.encode(text)


def test_mask_slot_named_spare_gap_and_added(tmp_path, char_tok):
    named = find_mask_slot(char_tok, char_tok.vocab_size)
    assert (named.token_id, named.how, named.needs_resize(char_tok.vocab_size)) == (
        char_tok.token_id(MASK_TOKEN), "named", False)

    write_char_tokenizer(tmp_path, 96)  # no mask-named token
    tok = ChatTokenizer.from_dir(tmp_path)
    n = tok.max_token_id + 1
    spare = find_mask_slot(tok, n + 5)
    assert (spare.token_id, spare.vocab_size, spare.how) == (n, n + 5, "spare")
    assert spare.token_id not in tok.encode("".join(chr(c) for c in range(1, 128)))
    added = find_mask_slot(tok, n, pad_to_multiple_of=64)
    assert (added.token_id, added.vocab_size, added.how) == (n, 128, "added") and added.needs_resize(n)
    assert find_mask_slot(tok, n).vocab_size == n + 1


def test_mask_slot_uses_a_gap_inside_the_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1, "c": 3}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = ChatTokenizer(raw)
    slot = find_mask_slot(tok, 4)
    assert (slot.token_id, slot.how) == (2, "spare")


def test_from_dir_errors_and_template_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ChatTokenizer.from_dir(tmp_path)
    save_char_tokenizer(tmp_path, chat_template="from-config")
    assert ChatTokenizer.from_dir(tmp_path).chat_template == "from-config"
    # A list of named templates (older HF format): the default one is used.
    cfg_file = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]
    cfg_file.write_text(json.dumps(cfg))
    assert ChatTokenizer.from_dir(tmp_path).chat_template == "d"
    # chat_template.jinja (the current HF layout) takes precedence over the config.
    (tmp_path / "chat_template.jinja").write_text("from-file")
    assert ChatTokenizer.from_dir(tmp_path).chat_template == "from-file"


def test_alphabet_must_not_repeat(tmp_path):
    with pytest.raises(ValueError, match="repeats"):
        save_char_tokenizer(tmp_path, alphabet="aab")
