"""Chat templates: Hugging Face style Jinja templates, rendered in a sandbox (jinja2 is imported lazily)."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

# The ChatML layout as a template; what the built-in renderer produces, and what the toy tokenizer ships with.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class TemplateError(ValueError):
    """A chat template that cannot be compiled, or that raised while rendering."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, > and & for HTML; chat templates expect plain JSON.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str):
    try:
        from jinja2.exceptions import TemplateSyntaxError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 ships with transformers
        raise ImportError("rendering a chat template needs jinja2 (pip install jinja2)") from e
    # trim_blocks / lstrip_blocks: the whitespace rules chat templates are written against.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not compile: {e}") from e


def render_template(template: str, messages: list[dict[str, str]], *, add_generation_prompt: bool = False,
                    **variables: Any) -> str:
    """Render ``messages`` (role/content dicts) through ``template``; ``variables`` (bos_token, ...) pass through."""
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **variables)
    except TemplateError:
        raise
    except Exception as e:  # a template bug surfaces as whatever jinja raised: name it as such
        raise TemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e
