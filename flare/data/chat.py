"""Chat rendering: a Conversation -> ChatML text -> token ids with the label mask (method §5).

Layout: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn. Assistant reasoning is merged into
``<think>\\n...\\n</think>\\n\\n`` before the content; for a tokenizer with think tokens (a model that thinks:
``ChatTokenizer.thinks``) the final assistant turn always carries a think block (empty when it has no
reasoning), for one without (SmolLM2, Llama) only turns with reasoning do. Supervised tokens: each assistant
turn's content (think block included) and its ``<|im_end|>``; never the ``<|im_start|>assistant\\n`` header, the
newline after ``<|im_end|>``, or any system/user token.

The text comes from the tokenizer's chat template when it has one, else from the built-in renderer (the same
layout). Labels are found on the rendered text, by character span, so they hold for any ChatML template.
"""

from __future__ import annotations

from flare.data.conversation import Conversation, RowRejected
from flare.data.document import Document
from flare.data.template import TemplateError, render_template
from flare.data.think import merge_reasoning
from flare.data.tokenizers import ChatTokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ASSISTANT_HEADER = f"{IM_START}assistant\n"


def chat_messages(conversation: Conversation, thinks: bool = True) -> list[dict[str, str]]:
    """Role/content dicts with reasoning already merged into think blocks (what a template receives). ``thinks``:
    the model writes a think block before every final answer, so a final turn without reasoning gets an empty
    one; a model without think tokens never writes one, and its turns without reasoning stay plain content."""
    final = conversation.final_assistant_index if thinks else -1
    return [
        {"role": m.role,
         "content": merge_reasoning(m.content, m.reasoning, i == final) if m.role == "assistant" else m.content}
        for i, m in enumerate(conversation.messages)
    ]


def render_chatml(messages: list[dict[str, str]]) -> str:
    """The built-in ChatML renderer."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def render_text(conversation: Conversation, template: str | None = None, thinks: bool = True,
                **variables: str) -> str:
    """The conversation as text: through ``template`` (a Jinja chat template) if given, else built-in ChatML;
    ``thinks`` as in ``chat_messages``."""
    messages = chat_messages(conversation, thinks)
    if template is None:
        return render_chatml(messages)
    return render_template(template, messages, add_generation_prompt=False, **variables)


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of every assistant turn's body, its ``<|im_end|>`` included."""
    spans, pos = [], 0
    while (head := text.find(ASSISTANT_HEADER, pos)) >= 0:
        start = head + len(ASSISTANT_HEADER)
        end = text.find(IM_END, start)
        if end < 0:
            raise TemplateError(f"assistant turn at character {head} has no {IM_END}")
        spans.append((start, end + len(IM_END)))
        pos = end
    return spans


def _labels(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """A token is supervised iff it starts inside a span (offsets and spans are both in text order)."""
    labels, k = [], 0
    for start, _ in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        labels.append(k < len(spans) and spans[k][0] <= start)
    return labels


def render(conversation: Conversation, tokenizer: ChatTokenizer, *, use_template: bool = True) -> Document:
    """Token ids [T] and loss mask [T] of one conversation.

    Raises ``RowRejected("special_token_in_content")`` when message text spells a special token of this
    tokenizer (it would be encoded as that token), and ``TemplateError`` when the template does not produce
    ChatML assistant turns.
    """
    specials = tokenizer.special_strings
    for m in conversation.messages:
        if any(s in m.content or s in (m.reasoning or "") for s in specials):
            raise RowRejected("special_token_in_content", f"a {m.role} turn spells a special token")
    template = tokenizer.chat_template if use_template else None
    text = render_text(conversation, template, tokenizer.thinks, **tokenizer.template_variables)
    spans = assistant_spans(text)
    if not spans:
        raise TemplateError(f"the chat template produced no '{ASSISTANT_HEADER!r}' turn: is it ChatML?")
    ids, offsets = tokenizer.encode_with_offsets(text)
    return Document(ids, _labels(offsets, spans))
