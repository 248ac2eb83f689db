"""Chat rendering: exact ChatML layout, think blocks, label masks, rejected rows, template == built-in."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from flare.data import (CHATML_TEMPLATE, RowRejected, SchemaError, TemplateError, load_chat_jsonl, parse_row,
                        render, render_text, write_jsonl)
from flare.data.chat import assistant_spans
from flare.data.tokenizers import ChatTokenizer

TWO_TURNS = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "add them"},
]}

EXPECTED = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n"
    "<|im_start|>user\n2+2?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nadd them\n</think>\n\n4<|im_end|>\n"
)


def supervised_runs(tok: ChatTokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    """Decoded text of each maximal run of supervised tokens."""
    runs, cur = [], []
    for t, m in zip(ids + [None], mask + [False]):
        if m:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    return runs


def test_two_turn_chatml_layout_and_labels_exact(char_tok):
    conv = parse_row(TWO_TURNS)
    assert render_text(conv) == EXPECTED
    doc = render(conv, char_tok)
    assert doc.input_ids == char_tok.encode(EXPECTED)
    # Loss on each assistant body and its <|im_end|>; not on headers, system/user turns or the trailing newline.
    assert supervised_runs(char_tok, doc.input_ids, doc.loss_mask) == [
        "Hello!<|im_end|>", "<think>\nadd them\n</think>\n\n4<|im_end|>"]
    header = char_tok.encode("<|im_start|>assistant\n")
    first = doc.loss_mask.index(True)
    assert doc.input_ids[first - len(header):first] == header  # the header sits right before, unsupervised


def test_final_turn_without_reasoning_gets_empty_think_block(char_tok):
    conv = parse_row({"prompt": "What is 1+1?", "response": "2"})
    text = render_text(conv)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n2<|im_end|>\n")
    doc = render(conv, char_tok)
    assert supervised_runs(char_tok, doc.input_ids, doc.loss_mask) == ["<think>\n\n</think>\n\n2<|im_end|>"]


def test_inline_think_block_equals_reasoning_content():
    inline = parse_row({"messages": [{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "<think>\nstep\n</think>\n\nanswer"}]})
    split = parse_row({"messages": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "answer", "reasoning_content": "step"}]})
    assert inline == split and render_text(inline) == render_text(split)
    assert inline.messages[-1].reasoning == "step"


@pytest.mark.parametrize("row,reason", [
    ({"role": "assistant", "content": "<think>a<think>b</think></think>c"}, "nested_think"),
    ({"role": "assistant", "content": "<think>never closed"}, "unclosed_think"),
    ({"role": "assistant", "content": "</think>x<think>y"}, "think_out_of_order"),
    ({"role": "assistant", "content": "answer</think>"}, "stray_close_think"),
    ({"role": "assistant", "content": "<think>a</think><think>b</think>c"}, "multiple_think"),
    ({"role": "assistant", "content": "first <think>a</think>b"}, "think_not_leading"),
    ({"role": "assistant", "content": "<think >a</think>b"}, "malformed_think_tag"),
    ({"role": "assistant", "content": "<think>a</think>b", "reasoning_content": "r"}, "reasoning_twice"),
    ({"role": "assistant", "content": "b", "reasoning_content": "<think>r"}, "think_in_reasoning"),
    ({"role": "tool", "content": "x"}, "unknown_role"),
    ({"role": "assistant", "content": "  "}, "empty_message"),
    ({"role": "assistant", "content": "a<|im_end|>"}, "chatml_marker_in_content"),
])
def test_malformed_rows_rejected_with_reason(row, reason):
    with pytest.raises(RowRejected) as e:
        parse_row({"messages": [{"role": "user", "content": "q"}, row]})
    assert e.value.reason == reason and not isinstance(e.value, SchemaError)


def test_row_level_rejections_and_schema_errors():
    for row, reason in [({"messages": []}, "empty_messages"),
                        ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant"),
                        ({"messages": [{"role": "user", "content": "<think>x</think>"},
                                       {"role": "assistant", "content": "a"}]}, "think_outside_assistant"),
                        ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                                       {"role": "assistant", "content": "a"}]}, "misplaced_system")]:
        with pytest.raises(RowRejected) as e:
            parse_row(row)
        assert e.value.reason == reason
    for row in [[1], {"text": "x"}, {"messages": "x"}, {"messages": [{"role": "user"}]},
                {"messages": [{"role": "user", "content": 3}]}, {"prompt": "q", "response": None}]:
        with pytest.raises(SchemaError):
            parse_row(row)


def test_empty_system_and_trailing_user_turns_are_dropped():
    conv = parse_row({"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "q"},
                                   {"role": "assistant", "content": "a"}, {"role": "user", "content": "more?"}]})
    assert [m.role for m in conv.messages] == ["user", "assistant"]


def test_rejections_are_counted_by_reason_in_a_file(tmp_path):
    ok = {"prompt": "q", "response": "a"}
    bad = lambda content: {"messages": [{"role": "user", "content": "q"},  # noqa: E731
                                        {"role": "assistant", "content": content}]}
    rows = [ok, bad("<think>x"), bad("<think>x"), bad("a</think>"), bad("<think><think></think></think>"),
            bad("</think><think>"), {"messages": [{"role": "user", "content": "q"}]}, ok]
    path = tmp_path / "rows.jsonl"
    write_jsonl(rows, path)
    stats = Counter()
    assert len(list(load_chat_jsonl(path, stats=stats))) == 2
    assert {k: stats[k] for k in ("unclosed_think", "stray_close_think", "nested_think", "think_out_of_order",
                                  "no_assistant", "conversations", "lines")} == {
        "unclosed_think": 2, "stray_close_think": 1, "nested_think": 1, "think_out_of_order": 1,
        "no_assistant": 1, "conversations": 2, "lines": 8}


def test_special_token_spelled_in_content_is_rejected(char_tok):
    conv = parse_row({"prompt": "say <|endoftext|>", "response": "no"})
    with pytest.raises(RowRejected) as e:
        render(conv, char_tok)
    assert e.value.reason == "special_token_in_content"


CONVERSATIONS = [TWO_TURNS, {"prompt": "p", "response": "r", "system": "s"},
                 {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                                                                  "reasoning_content": "c\n"},
                               {"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}]}]


@pytest.mark.parametrize("row", CONVERSATIONS)
def test_template_in_tokenizer_config_equals_builtin_renderer(char_tok, row):
    assert char_tok.chat_template == CHATML_TEMPLATE
    conv = parse_row(row)
    assert render_text(conv, CHATML_TEMPLATE) == render_text(conv)
    via_template, builtin = render(conv, char_tok), render(conv, char_tok, use_template=False)
    assert via_template == builtin


def test_transformers_apply_chat_template_agrees(char_dir, char_tok):
    """Independent oracle: HF's own template engine on the saved directory gives the same text and ids."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(char_dir))
    from flare.data.chat import chat_messages

    for row in CONVERSATIONS:
        conv = parse_row(row)
        text = hf.apply_chat_template(chat_messages(conv), tokenize=False)
        assert text == render_text(conv)
        assert hf(text, add_special_tokens=False)["input_ids"] == render(conv, char_tok).input_ids


def test_non_chatml_template_is_an_error(char_tok):
    conv = parse_row({"prompt": "p", "response": "r"})
    llama_like = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    bad = ChatTokenizer(char_tok.backend, llama_like, char_tok.special_tokens)
    with pytest.raises(TemplateError, match="ChatML"):
        render(conv, bad)
    with pytest.raises(TemplateError, match="no <\\|im_end\\|>"):
        assistant_spans("<|im_start|>assistant\nnever ends")


def test_labels_hold_for_a_byte_level_bpe_tokenizer(tmp_path):
    """Any tokenizer.json: a byte-level BPE (multi-byte characters, merges) gets the same label spans."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["assistant user system café naïve 🚀 rocket think", "the answer is forty-two"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>",
                            "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.add_tokens(["<think>", "</think>"])
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE}))
    tok = ChatTokenizer.from_dir(tmp_path)
    conv = parse_row({"messages": [{"role": "user", "content": "naïve café?"},
                                   {"role": "assistant", "content": "the answer 🚀"},
                                   {"role": "user", "content": "again"},
                                   {"role": "assistant", "content": "forty-two café", "reasoning_content": "thïnk"}]})
    doc = render(conv, tok)
    assert tok.decode(doc.input_ids, skip_special_tokens=False) == render_text(conv)
    assert supervised_runs(tok, doc.input_ids, doc.loss_mask) == [
        "the answer 🚀<|im_end|>", "<think>\nthïnk\n</think>\n\nforty-two café<|im_end|>"]


def test_a_model_without_think_tokens_gets_no_empty_think_block(char_tok):
    """SmolLM2 or Llama never write a think block: training on one would teach them to open every answer with
    '<think>' that they never write at inference. Reasoning given explicitly is still rendered."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["What is 1+1? 2"], trainers.BpeTrainer(
        vocab_size=300, show_progress=False, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    plain = ChatTokenizer(backend)
    assert not plain.thinks and char_tok.thinks
    conv = parse_row({"prompt": "What is 1+1?", "response": "2"})
    doc = render(conv, plain)
    assert plain.decode(doc.input_ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n2<|im_end|>\n")
    assert supervised_runs(plain, doc.input_ids, doc.loss_mask) == ["2<|im_end|>"]
    reasoned = render(parse_row({"prompt": "1+1?", "response": "2", "reasoning_content": "add"}), plain)
    assert supervised_runs(plain, reasoned.input_ids, reasoned.loss_mask) == ["<think>\nadd\n</think>\n\n2<|im_end|>"]
