"""Fixtures for the data tests: a character-level ChatML tokenizer directory, built once per session."""

from __future__ import annotations

import pytest

from flare.data import ChatTokenizer, save_char_tokenizer


@pytest.fixture(scope="session")
def char_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("char_tokenizer")
    save_char_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def char_tok(char_dir) -> ChatTokenizer:
    return ChatTokenizer.from_dir(char_dir)
