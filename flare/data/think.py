"""Think tags: validating ``<think>...</think>`` inside message content and merging reasoning into it.

A well-formed assistant content holds either no think tag at all or exactly one block that opens the content
(after optional whitespace). Anything else is rejected with a reason (method §5: malformed, nested or unclosed
think tags are dropped from the transfer data).
"""

from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Anything that looks like a think tag, spelled canonically or not (``<think >``, ``<THINK>``, ``<think/>``).
_TAG_LIKE = re.compile(r"<\s*/?\s*think\b[^<>]*>", re.IGNORECASE)


def has_think_tag(text: str) -> bool:
    """True when ``text`` contains anything that looks like a think tag."""
    return _TAG_LIKE.search(text) is not None


def think_tag_problem(content: str) -> str | None:
    """None when ``content`` has no think tag or one leading ``<think>...</think>`` block; else the reason.

    Reasons: ``malformed_think_tag``, ``nested_think``, ``multiple_think``, ``think_out_of_order`` (a close tag
    before an open one), ``stray_close_think`` (a close tag never opened), ``unclosed_think``, ``think_not_leading``.
    """
    tags = [(m.start(), m.group()) for m in _TAG_LIKE.finditer(content)]
    if not tags:
        return None
    if any(tag not in (THINK_OPEN, THINK_CLOSE) for _, tag in tags):
        return "malformed_think_tag"
    depth, blocks = 0, 0
    for k, (_, tag) in enumerate(tags):
        if tag == THINK_OPEN:
            if depth:
                return "nested_think"
            if blocks:
                return "multiple_think"
            depth = 1
        elif not depth:
            later_open = any(t == THINK_OPEN for _, t in tags[k + 1:])
            return "think_out_of_order" if later_open else "stray_close_think"
        else:
            depth, blocks = 0, blocks + 1
    if depth:
        return "unclosed_think"
    if content[: tags[0][0]].strip():
        return "think_not_leading"
    return None


def split_think(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a content already validated by ``think_tag_problem``; reasoning None if no block."""
    if THINK_OPEN not in content:
        return None, content
    head, rest = content.split(THINK_CLOSE, 1)
    reasoning = head.split(THINK_OPEN, 1)[1]
    return reasoning.strip("\n"), rest.lstrip("\n")


def merge_reasoning(content: str, reasoning: str | None, final: bool) -> str:
    """The assistant text as rendered: ``<think>\\n{reasoning}\\n</think>\\n\\n{content}``.

    A final turn without reasoning gets an empty block (``<think>\\n\\n</think>\\n\\n``) so that the converted
    model learns to open and close it exactly as the seed model does at inference; an earlier turn without
    reasoning is rendered as plain content.
    """
    if reasoning is None and not final:
        return content
    return f"{THINK_OPEN}\n{(reasoning or '').strip(chr(10))}\n{THINK_CLOSE}\n\n{content.lstrip(chr(10))}"
