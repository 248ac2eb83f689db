"""Conversations: parsing and validating chat rows, before any tokenizer is involved.

Accepted rows (extra keys are ignored):

- ``{"messages": [{"role": "system|user|assistant", "content": str, "reasoning_content"?: str}, ...]}``
- ``{"prompt": str, "response": str, "system"?: str, "reasoning_content"?: str}``

A row that breaks the schema raises ``SchemaError``; a well-formed row that the data policy refuses raises
``RowRejected``; both carry a short ``reason`` used as a counter key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from flare.data.think import has_think_tag, split_think, think_tag_problem

ROLES = ("system", "user", "assistant")
# Rendering finds assistant turns by these markers: content that contains them would corrupt the label mask.
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")


class RowRejected(Exception):
    """A row the data policy drops (counted under ``reason``, never fatal)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SchemaError(RowRejected):
    """A row that is not a chat row at all (fatal under ``on_error="raise"``)."""

    def __init__(self, detail: str) -> None:
        super().__init__("schema", detail)


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    # The reasoning trace, without think tags; None when the turn has none (not the same as an empty trace).
    reasoning: str | None = None


@dataclass(frozen=True)
class Conversation:
    """Validated messages: at most one leading system turn, ending with an assistant turn."""

    messages: tuple[Message, ...]
    # Where the row came from ("file.jsonl:12"), for error messages; not part of equality.
    origin: str | None = field(default=None, compare=False)

    @property
    def final_assistant_index(self) -> int:
        """Index of the last assistant turn (the one that always carries a think block); -1 if none."""
        return max((i for i, m in enumerate(self.messages) if m.role == "assistant"), default=-1)


def _optional_str(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise SchemaError(f"{where}{key} must be a string, got {type(value).__name__}")
    return value


def _raw_messages(row: Mapping[str, Any]) -> list[Any]:
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list):
            raise SchemaError(f"'messages' must be a list, got {type(messages).__name__}")
        return messages
    if "prompt" in row and "response" in row:
        prompt, response = _optional_str(row, "prompt", ""), _optional_str(row, "response", "")
        system = _optional_str(row, "system", "")
        turns = [{"role": "system", "content": system}] if system else []
        return turns + [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": response,
                         "reasoning_content": row.get("reasoning_content")}]
    raise SchemaError("expected a 'messages' list or 'prompt' and 'response' strings")


def _message(i: int, raw: Any) -> Message:
    if not isinstance(raw, Mapping):
        raise SchemaError(f"messages[{i}] must be an object, got {type(raw).__name__}")
    where = f"messages[{i}]."
    role = raw.get("role")
    if not isinstance(role, str):
        raise SchemaError(f"{where}role must be a string")
    content = _optional_str(raw, "content", where)
    if content is None:
        raise SchemaError(f"{where}content is missing")
    reasoning = _optional_str(raw, "reasoning_content", where)
    if role not in ROLES:
        raise RowRejected("unknown_role", f"{where}role {role!r} (expected one of {ROLES})")
    for text in (content, reasoning or ""):
        if any(m in text for m in CHATML_MARKERS):
            raise RowRejected("chatml_marker_in_content", f"{where} contains a ChatML marker")
    if role != "assistant":
        if has_think_tag(content) or reasoning is not None:
            raise RowRejected("think_outside_assistant", f"{where} ({role}) has think tags or reasoning")
        return Message(role, content)
    if reasoning is not None and has_think_tag(reasoning):
        raise RowRejected("think_in_reasoning", f"{where}reasoning_content contains think tags")
    problem = think_tag_problem(content)
    if problem is not None:
        raise RowRejected(problem, f"{where}content")
    inline, answer = split_think(content)
    if inline is not None and reasoning is not None:
        raise RowRejected("reasoning_twice", f"{where} has reasoning_content and a think block")
    return Message(role, answer, reasoning if inline is None else inline)


def parse_row(row: Any, origin: str | None = None) -> Conversation:
    """Validate one row; raises ``SchemaError`` or ``RowRejected`` (with a reason) when it cannot be used.

    Empty system turns are dropped (common in exported data, and they carry nothing); trailing turns after the
    last assistant turn are dropped (they would never be supervised).
    """
    if not isinstance(row, Mapping):
        raise SchemaError(f"a row must be an object, got {type(row).__name__}")
    raw = _raw_messages(row)
    if not raw:
        raise RowRejected("empty_messages")
    messages = [_message(i, m) for i, m in enumerate(raw)]
    messages = [m for m in messages if not (m.role == "system" and not m.content.strip())]
    for i, m in enumerate(messages):
        if m.role == "system" and i > 0:
            raise RowRejected("misplaced_system", f"system turn at position {i}")
        if not m.content.strip() and not (m.reasoning or "").strip():
            raise RowRejected("empty_message", f"{m.role} turn at position {i} is empty")
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
    if last is None:
        raise RowRejected("no_assistant")
    return Conversation(tuple(messages[: last + 1]), origin)
