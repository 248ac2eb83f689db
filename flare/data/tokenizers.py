"""ChatTokenizer: any Hugging Face ``tokenizer.json`` plus what chat rendering needs from its directory.

Reads ``tokenizer.json`` (a ``tokenizers.Tokenizer``), the chat template (``chat_template.jinja``,
else ``tokenizer_config.json``'s ``chat_template``) and the named special tokens of ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Qwen's padding token; used when the config names none.
DEFAULT_PAD = "<|endoftext|>"


def _token_string(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    file = directory / "chat_template.jinja"
    if file.exists():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        # Several named templates: the default one is what apply_chat_template would use.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class ChatTokenizer:
    """Token ids <-> text with the chat template and special tokens of one tokenizer directory."""

    def __init__(self, backend, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_dir(cls, path: str | Path) -> "ChatTokenizer":
        """Load ``path/tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja`` when present)."""
        from tokenizers import Tokenizer

        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        specials = {k: s for k in SPECIAL_KEYS if (s := _token_string(config.get(k))) is not None}
        return cls(backend, _chat_template(path, config), specials)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (added tokens included); the model may have more rows."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_id(self) -> int:
        return max(self.backend.get_vocab(with_added_tokens=True).values())

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and, per token, its (start, end) character span in ``text``."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @cached_property
    def thinks(self) -> bool:
        """Whether the vocabulary has ``<think>`` and ``</think>`` as tokens of their own: a model that writes a
        think block before its answer (Qwen3.5, the toy tokenizer), unlike SmolLM2 or Llama."""
        return all(self.token_id(tag) is not None for tag in ("<think>", "</think>"))

    @cached_property
    def special_strings(self) -> frozenset[str]:
        """Every added token marked special (they must never come from message text)."""
        added = self.backend.get_added_tokens_decoder()
        return frozenset(t.content for t in added.values() if t.special)

    @property
    def pad_id(self) -> int:
        """The padding id: the configured pad token, else ``<|endoftext|>``, else the eos token, else 0."""
        for name in (self.special_tokens.get("pad_token"), DEFAULT_PAD, self.special_tokens.get("eos_token")):
            if name is not None and (i := self.token_id(name)) is not None:
                return i
        return 0

    @property
    def template_variables(self) -> dict[str, str]:
        """What HF passes to a chat template besides the messages (``bos_token``, ``eos_token``, ...)."""
        return dict(self.special_tokens)
