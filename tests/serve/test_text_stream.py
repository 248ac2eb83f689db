"""TextStream's windowed detokenisation gives the text a whole decode gives, push by push, with stop strings,
for byte-level BPE (multi-byte characters split across tokens), byte-fallback SentencePiece-style, character
and WordPiece (clean-up across tokens) tokenizers; and each push decodes a few ids, not the whole output."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from flare.data.tokenizers import ChatTokenizer
from flare.engine.llm import TextStream
from flare.testing.checkpoints import write_char_tokenizer

CORPUS = ["héllo wörld, naïve café", "你好，世界！数学很有趣", "🙂🎉 emoji 👩‍👩‍👧 families", "12+34=46\n7*8=56",
          "Ωmega ≈ 3.14 ∑ ∞ → ∂", "Grüße aus Köln: ½ € ¥ £", "日本語のテキスト、カタカナ"]
ALPHABET = sorted(set("".join(CORPUS)))


class WholeDecodeStream:
    """The stream as it was before windows: the whole output decoded on every push (the reference)."""

    def __init__(self, tokenizer, stop=None):
        self.tokenizer, self.stop = tokenizer, [s for s in (stop or []) if s]
        self.ids, self.sent, self.text, self.stopped = [], 0, "", False

    def push(self, new_ids, finished):
        if self.stopped:
            return ""
        self.ids += new_ids
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped, text, safe = True, text[:cut], cut
        elif finished:
            safe = len(text)
        else:
            safe = len(text.rstrip("\ufffd"))
            hold = max((len(s) - 1 for s in self.stop), default=0)
            safe = max(self.sent, min(safe, len(text) - hold))
        self.text = text
        delta, self.sent = text[self.sent:safe], max(self.sent, safe)
        return delta


def _byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # A small vocabulary: most multi-byte characters stay split over two or three byte tokens.
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def _byte_fallback() -> Tokenizer:
    """Llama/SentencePiece style: '▁' for spaces, <0xNN> byte tokens for characters outside the vocabulary."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "a", "b", "c", "é", "▁a", "▁b", "ab", "▁ab", "1", "2", "+", "="]:
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("▁", "b"), ("a", "b"), ("▁a", "b")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def _wordpiece() -> Tokenizer:
    vocab = {"[UNK]": 0, "[SEP]": 1}
    for w in ["do", "n", "'", "t", "##n", "##'", "##t", "it", ".", ",", "!", "?", "a", "##b", "b", "don", "##t"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # " ." -> ".", " n't" -> "n't": across tokens
    tok.add_special_tokens(["[SEP]"])
    return tok


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    char_dir = tmp_path_factory.mktemp("char")
    write_char_tokenizer(char_dir, 96)
    return {"byte_level": ChatTokenizer(_byte_level()), "byte_fallback": ChatTokenizer(_byte_fallback()),
            "char": ChatTokenizer.from_dir(char_dir), "wordpiece": ChatTokenizer(_wordpiece())}


def _pushes(rng: random.Random, ids: list[int]) -> list[list[int]]:
    """ids cut into steps of 0 to 5 tokens, as a mix of causal and block-wise modes commits them."""
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([0, 1, 1, 1, 2, 3, 5])
        out.append(ids[i: i + n])
        i += n
    return out


def _run(stream, pushes: list[list[int]]) -> list[str]:
    deltas = [stream.push(p, False) for p in pushes]
    deltas.append(stream.push([], True))
    return deltas


def _random_text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 60)))
    line = rng.choice(CORPUS)
    start = rng.randrange(len(line))
    return line[start: start + rng.randrange(1, 40)] + " " + rng.choice(CORPUS)


def test_the_byte_tokenizers_split_characters_across_tokens(tokenizers):
    for kind in ("byte_level", "byte_fallback"):
        tok = tokenizers[kind]
        ids = tok.encode("你好 🙂 Köln")
        assert sum("\ufffd" in tok.decode([i]) for i in ids) >= 4, kind


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("kind", ["byte_level", "byte_fallback", "char"])
def test_encoded_text_streams_back_whole(tokenizers, kind, seed):
    tok, rng = tokenizers[kind], random.Random(seed)
    text = _random_text(rng)
    if kind == "char":
        text = "".join(c for c in text if c in "0123456789+-*/=() abcdefghijklmnopqrstuvwxyz")
    ids = tok.encode(text)
    pushes = _pushes(rng, ids)
    deltas = _run(TextStream(tok), pushes)
    assert "".join(deltas) == tok.decode(ids)
    assert deltas == _run(WholeDecodeStream(tok), pushes)
    # Only whole characters are sent before the end: no delta carries a replacement character.
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("kind", ["byte_level", "byte_fallback", "char", "wordpiece"])
def test_random_ids_stream_as_whole_decodes_do(tokenizers, kind, seed):
    """Any ids, invalid byte runs and special tokens included: push for push what decoding the whole output on
    every push sends. (A byte-fallback decoder turns a whole run of byte tokens into U+FFFDs when one byte in it
    is invalid, rewriting text already sent; there only the final text is the same.)"""
    tok, rng = tokenizers[kind], random.Random(1000 + seed)
    vocab = tok.vocab_size
    ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 80))]
    pushes = _pushes(rng, ids)
    stream = TextStream(tok)
    deltas = _run(stream, pushes)
    assert stream.text == tok.decode(ids)
    if kind != "byte_fallback":
        assert deltas == _run(WholeDecodeStream(tok), pushes)
    if kind in ("byte_level", "char"):
        assert "".join(deltas) == tok.decode(ids)


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("kind", ["byte_level", "char"])
def test_stop_strings_cut_where_whole_decodes_cut(tokenizers, kind, seed):
    tok, rng = tokenizers[kind], random.Random(2000 + seed)
    text = "12+34=46\n7*8=56\n99-1=98" if kind == "char" else _random_text(rng)
    ids = tok.encode(text)
    # Stops taken from the text (found) and one that is not in it.
    stops = []
    for _ in range(rng.randrange(1, 4)):
        i = rng.randrange(len(text))
        stops.append(text[i: i + rng.randrange(1, 4)])
    stops.append("@@")
    pushes = _pushes(rng, ids)
    new, ref = TextStream(tok, stops), WholeDecodeStream(tok, stops)
    assert _run(new, pushes) == _run(ref, pushes)
    assert new.stopped == ref.stopped and new.text == ref.text
    if new.stopped:
        assert not any(s in new.text for s in stops) and any((new.text + s) in text for s in stops)


def test_a_push_decodes_a_window_not_the_whole_output(tokenizers):
    class Counting:
        def __init__(self, tok):
            self.tok, self.decoded = tok, 0

        def decode(self, ids):
            self.decoded += len(ids)
            return self.tok.decode(ids)

    tok = tokenizers["byte_level"]
    ids = tok.encode(" ".join(CORPUS) * 20)
    counting = Counting(tok)
    stream = TextStream(counting)
    text = "".join(stream.push([t], False) for t in ids) + stream.push([], True)
    assert text == tok.decode(ids)
    # A window spans the last few pushes: a few dozen ids per push at most, plus one whole decode at the end
    # (decoding the whole output on every push would be len(ids) ** 2 / 2 ids).
    assert len(ids) > 1000 and counting.decoded < 3 * (TextStream.ADVANCE + 4) * len(ids) + len(ids)
