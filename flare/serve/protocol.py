"""The OpenAI-compatible request bodies, validated, and their translation into engine settings.

Standard fields keep OpenAI's names and defaults; extensions (as vLLM names them) are ``top_k`` and
``ignore_eos``; the decoding mode and its options come in a ``flare`` object, e.g.
``"flare": {"mode": "ar_trust", "gen_block": 4}``, read by ``flare.decoding.mode_from_json`` (no mode: the
server's ``--mode`` and its options, those given in the field replacing them).
Fields the server cannot honour (``n`` > 1, logprobs, penalties, ``echo``, ``best_of``) are refused with a
message rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from flare.decoding import ModeOptions, SamplingParams, mode_from_json


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    ignore_eos: bool = False
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    flare: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence and frequency penalties are not supported")
        return self

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            max_new_tokens=self.max_tokens or default_max_tokens, seed=self.seed, ignore_eos=self.ignore_eos,
        )

    def mode(self, default: ModeOptions) -> ModeOptions | None:
        """The decoding mode the ``flare`` field asks for (from the server's ``default`` when it names no mode);
        None (the server's default) without the field."""
        return mode_from_json(self.flare, default) if self.flare is not None else None


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictInt] | list[StrictStr]
    echo: bool = False
    best_of: int | None = None
    suffix: StrictStr | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request")
            v = v[0]
        if len(v) == 0:
            raise ValueError("the prompt is empty")
        return v

    @model_validator(mode="after")
    def _plain(self):
        if self.echo or (self.best_of not in (None, 1)) or self.suffix:
            raise ValueError("echo, best_of and suffix are not supported")
        return self


class ContentPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Union[StrictStr, list[ContentPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling(default_max_tokens)
