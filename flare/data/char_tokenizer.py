"""A character-level chat tokenizer for toy tasks, saved as a real Hugging Face tokenizer directory.

Layout of the ids: the special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<think>``,
``</think>``, ``<|unk|>``), then one id per character of the alphabet, then ``<|mask|>`` last. ``<|mask|>`` is a
vocabulary entry but not an added token: the pre-tokenizer splits text into single characters, so encoding any
text can never produce it (it is the [MASK] row of the diffusion stream, like Qwen3.5's spare row).
"""

from __future__ import annotations

import json
from pathlib import Path

from flare.data.template import CHATML_TEMPLATE
from flare.data.tokenizers import ChatTokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")
UNK_TOKEN = "<|unk|>"
MASK_TOKEN = "<|mask|>"
# Newline plus printable ASCII: enough for arithmetic, \boxed{...} and short English.
DEFAULT_ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A ``tokenizers.Tokenizer``: one id per character, ChatML and think tokens added, ``<|mask|>`` last."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if len(set(alphabet)) != len(alphabet):
        raise ValueError("the alphabet repeats a character")
    tokens = [*SPECIAL_TOKENS, *THINK_TOKENS, UNK_TOKEN, *alphabet, MASK_TOKEN]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*SPECIAL_TOKENS, UNK_TOKEN)])
    # Think tags are added but not special (as in Qwen3): decoding keeps them in the text.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok


def save_char_tokenizer(path: str | Path, alphabet: str = DEFAULT_ALPHABET,
                        chat_template: str | None = CHATML_TEMPLATE) -> ChatTokenizer:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template) to ``path``; load them back.

    The directory loads with ``flare.data.tokenizers.ChatTokenizer.from_dir`` and with ``transformers.AutoTokenizer``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_char_tokenizer(alphabet).save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": UNK_TOKEN,
        "model_max_length": 1 << 20,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return ChatTokenizer.from_dir(path)
