"""Text <-> token ids at the edges (CLI, server, evaluation), through any Hugging Face ``tokenizer.json``."""

from __future__ import annotations

from pathlib import Path


class TextTokenizer:
    def __init__(self, backend) -> None:
        self.backend = backend  # tokenizers.Tokenizer

    @classmethod
    def from_dir(cls, path: str | Path) -> "TextTokenizer | None":
        """The tokenizer saved beside a checkpoint, or None when the directory has no tokenizer.json."""
        from tokenizers import Tokenizer

        file = Path(path) / "tokenizer.json"
        return cls(Tokenizer.from_file(str(file))) if file.exists() else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)
