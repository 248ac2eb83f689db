"""From a chat JSONL file to Documents: read, validate, deduplicate, render; every drop counted by reason.

Two kinds of drops, both counted in one ``Counter``:
- malformed rows (``invalid_json``, ``not_object``, ``invalid_utf8``, ``schema``) obey ``on_error``;
- rows refused by the data policy (think-tag problems, ``unknown_role``, ``empty_message``, ``no_assistant``,
  ``duplicate``, ``special_token_in_content``, ``too_short``, ...) are always skipped and counted.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from flare.data.chat import render
from flare.data.conversation import Conversation, RowRejected, SchemaError, parse_row
from flare.data.dedup import Deduplicator
from flare.data.document import Document
from flare.data.jsonl import ErrorPolicy, read_jsonl
from flare.data.tokenizers import ChatTokenizer


def load_chat_jsonl(path: str | Path, *, on_error: str = "skip", dedup: bool | Deduplicator = False,
                    stats: Counter | None = None) -> Iterator[Conversation]:
    """Validated conversations of a JSONL file, in file order (``origin`` = ``"path:line"``).

    ``dedup=True`` drops exact duplicates within this file; pass one ``Deduplicator`` to several calls to
    deduplicate across files.
    """
    policy = ErrorPolicy(path, on_error, stats)
    deduplicator = Deduplicator(policy.stats) if dedup is True else (dedup or None)
    return _conversations(path, read_jsonl(path, policy=policy), policy, deduplicator)


def _conversations(path: str | Path, rows: Iterator[tuple[int, dict]], policy: ErrorPolicy,
                   deduplicator: Deduplicator | None) -> Iterator[Conversation]:
    for line, row in rows:
        try:
            conversation = parse_row(row, origin=f"{path}:{line}")
        except SchemaError as e:
            policy.malformed(line, e.reason, e.detail)
            continue
        except RowRejected as e:
            policy.stats[e.reason] += 1
            continue
        if deduplicator is not None and deduplicator.is_duplicate(conversation):
            continue
        policy.stats["conversations"] += 1
        yield conversation


def tokenize_conversations(conversations: Iterable[Conversation], tokenizer: ChatTokenizer, *,
                           stats: Counter | None = None, use_template: bool = True,
                           min_tokens: int = 0) -> Iterator[Document]:
    """Render each conversation; ``min_tokens`` drops short documents (the paper's long-reasoning source kept
    only samples of >= 3,000 tokens). A ``TemplateError`` (a template that is not ChatML) is not a row problem:
    it propagates."""
    stats = stats if stats is not None else Counter()
    for conversation in conversations:
        try:
            doc = render(conversation, tokenizer, use_template=use_template)
        except RowRejected as e:
            stats[e.reason] += 1
            continue
        if len(doc) < min_tokens:
            stats["too_short"] += 1
            continue
        stats["documents"] += 1
        yield doc


def load_documents(path: str | Path, tokenizer: ChatTokenizer, *, on_error: str = "skip",
                   dedup: bool | Deduplicator = False, stats: Counter | None = None, use_template: bool = True,
                   min_tokens: int = 0) -> Iterator[Document]:
    """``tokenize_conversations(load_chat_jsonl(path, ...), tokenizer, ...)`` sharing one ``stats``."""
    stats = stats if stats is not None else Counter()
    conversations = load_chat_jsonl(path, on_error=on_error, dedup=dedup, stats=stats)
    return tokenize_conversations(conversations, tokenizer, stats=stats, use_template=use_template,
                                  min_tokens=min_tokens)
