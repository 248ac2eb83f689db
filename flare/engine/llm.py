"""Text in, text out: prompts and chat messages to token ids, committed ids back to text, stop strings.

The only place in the engine where text appears. ``LLM`` is the offline entry point (a batch of prompts to
completions, through the batched ``Engine``); ``TextStream`` turns a sequence's committed tokens into text
deltas as they arrive, holding back what could still become a stop string or an incomplete character. The
server uses both.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from flare.data.chat import render_chatml
from flare.data.template import render_template
from flare.data.tokenizers import ChatTokenizer
from flare.decoding import OPTIONS, ModeOptions, SamplingParams
from flare.device import pick_device, pick_dtype
from flare.engine.engine import Engine, EngineConfig, RequestError
from flare.model import FlareModel

ROLES = ("system", "user", "assistant")


class TextStream:
    """Incremental detokenisation of one sequence with stop strings (OpenAI ``stop``).

    A push decodes a short window of ids, not the whole output: from the first id of the previous advance to
    the end. What the window's text adds beyond the text of its first ids (the prefix) is the new text, so a
    decoder's rules for the first token (SentencePiece's leading space, WordPiece's ``##``) apply alike to both
    and cancel, and a step costs the same at token 10 and at token 10,000. The window advances every ``ADVANCE``
    ids (one more decode, of its new prefix), and only past text that does not end in U+FFFD, so it always
    starts on a whole character. The last push decodes the whole
    output once; a decoder whose window text does not extend its prefix's text (clean-up rules across tokens)
    makes the stream decode the whole output on every push from then on, as it did before windows.
    """

    ADVANCE = 8  # ids past the prefix before the window moves on: one decode a push, two every 8 ids

    def __init__(self, tokenizer: ChatTokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) - 1 for s in self.stop), default=0)
        self.ids: list[int] = []
        self.sent = 0  # characters of text already handed out
        self.text = ""
        self.stopped = False  # a stop string was found; text is cut before it
        self._stable = ""  # the text of ids[:_read]: whole characters, final
        self._tail = ""  # the text of ids[_read:] so far (may end in an incomplete character)
        self._prefix = self._read = 0  # the window is ids[_prefix:]; ids[_prefix:_read] is its prefix
        self._prefix_text = ""
        self._full = False  # windows disagreed with their prefix once: decode the whole output every time

    def push(self, new_ids: list[int], finished: bool) -> str:
        """Add newly committed ids; return the text that is now safe to send (may be empty)."""
        if self.stopped:
            return ""
        self.ids += new_ids
        text = self._decode(bool(new_ids), finished)
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0),
                  default=-1) if self.stop else -1
        if cut >= 0:
            self.stopped, text, safe = True, text[:cut], cut
        elif finished:
            safe = len(text)
        else:
            # Hold back a partial character and anything that may be the start of a stop string.
            safe = len(text.rstrip("\ufffd"))
            safe = max(self.sent, min(safe, len(text) - self.hold))
        self.text = text
        delta, self.sent = text[self.sent:safe], max(self.sent, safe)
        return delta

    def _decode(self, grew: bool, finished: bool) -> str:
        """The text of every id so far."""
        decode, ids = self.tokenizer.decode, self.ids
        if finished or self._full:
            return decode(ids)
        if grew:
            window = decode(ids[self._prefix:])
            if not window.startswith(self._prefix_text):
                if window.endswith("\ufffd"):
                    # A byte-fallback decoder turns a whole run of byte tokens into U+FFFDs while its last
                    # character is incomplete: nothing new is known yet.
                    return self.text
                self._full = True
                return decode(ids)
            self._tail = window[len(self._prefix_text):]
            if len(ids) - self._read >= self.ADVANCE and self._tail and not self._tail.endswith("\ufffd"):
                self._stable += self._tail
                self._prefix, self._read, self._tail = self._read, len(ids), ""
                self._prefix_text = decode(ids[self._prefix: self._read])
        return self._stable + self._tail


@dataclass
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    forwards: int  # forwards the request took part in (prefill included)
    drafted: int = 0
    accepted: int = 0
    options: ModeOptions | None = None  # the mode as it ran: resolved against the checkpoint
    ttft: float | None = None  # seconds to the first output (``Sequence.ttft``)
    tpot: float | None = None  # seconds per output token after the first output (``Sequence.tpot``)

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / self.forwards if self.forwards else 0.0


class Prompter:
    """The text side of a served model: prompts and chat messages to ids, ids to text. An ``LLM`` is one; a
    server whose engine runs in another process builds one from what that process reports."""

    def __init__(self, tokenizer: ChatTokenizer | None, config: EngineConfig, modes: list[str],
                 name: str = "flare") -> None:
        self.tokenizer, self.config, self.modes, self.name = tokenizer, config, modes, name

    def _need_tokenizer(self) -> ChatTokenizer:
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer.json: send the prompt as a list of token ids")
        return self.tokenizer

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A completion prompt as ids: text through the tokenizer, or ids as given."""
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty")
            return self._need_tokenizer().encode(prompt)
        return list(prompt)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat messages rendered by the tokenizer's chat template (built-in ChatML without one), followed by
        the assistant header the model continues from."""
        return self._need_tokenizer().encode(self.chat_text(messages))

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        """The text ``chat_ids`` encodes."""
        tok = self._need_tokenizer()
        if not messages:
            raise RequestError("messages is empty: at least one message is needed")
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise RequestError(f"messages[{i}].role must be one of {ROLES}, got {m.get('role')!r}")
            if not isinstance(m.get("content"), str):
                raise RequestError(f"messages[{i}].content must be text")
            if any(s in m["content"] for s in tok.special_strings):
                raise RequestError(f"messages[{i}].content spells a special token of this tokenizer")
        if tok.chat_template is not None:
            return render_template(tok.chat_template, messages, add_generation_prompt=True, **tok.template_variables)
        return render_chatml(messages) + "<|im_start|>assistant\n"

    def stream(self, stop: list[str] | None = None) -> TextStream:
        return TextStream(self._need_tokenizer(), stop)


def servable_modes(config) -> list[str]:
    """The decoding modes a checkpoint of this ``ModelConfig`` can run (the parallel ones need a FLARE
    checkpoint: a [MASK] token)."""
    return [m for m, cls in OPTIONS.items() if not cls.needs_mask or config.mask_token_id is not None]


class LLM(Prompter):
    def __init__(self, model: FlareModel, tokenizer: ChatTokenizer | None, config: EngineConfig | None = None,
                 name: str = "flare") -> None:
        self.engine = Engine(model, config)
        super().__init__(tokenizer, self.engine.config, servable_modes(model.config), name)

    @classmethod
    def from_dir(cls, path: str | Path, *, device: str | None = None, dtype=None,
                 config: EngineConfig | None = None) -> "LLM":
        """Load a checkpoint directory (and its tokenizer.json when present); ``device`` None: CUDA when
        available, else the CPU; ``dtype`` None: bf16 where the hardware has it and the model is large
        enough to gain from it, else as stored (``flare.device.pick_dtype``)."""
        from flare.checkpoint import load_model

        path = Path(path)
        model = load_model(path, device=pick_device(device))
        chosen = pick_dtype(model.device, dtype, model.dtype, sum(p.numel() for p in model.parameters()))
        if chosen != model.dtype:
            model = model.to(chosen)
        tokenizer = ChatTokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
        return cls(model, tokenizer, config, name=path.name)

    @property
    def model(self) -> FlareModel:
        return self.engine.model

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams,
        mode: str | ModeOptions | None = None,
        stop: list[str] | None = None,
        progress: str | None = None,
    ) -> list[Completion]:
        """Complete every prompt (batched in the engine, queued beyond its slots); results in order. ``mode``:
        options, their ``mode:key=value`` text, or None for the engine's default. ``progress``: a label for a
        progress bar over finished prompts."""
        from tqdm.auto import tqdm

        engine = self.engine
        bar = tqdm(total=len(prompts), desc=progress, disable=progress is None, leave=False)
        pending = [(self.prompt_ids(p), f"llm-{uuid.uuid4().hex}") for p in prompts]
        streams = {rid: (self.stream(stop) if self.tokenizer is not None else None) for _, rid in pending}
        done: dict[str, Completion] = {}
        seqs = {}
        while pending or engine.has_work:
            while pending and engine.num_waiting < engine.config.max_waiting:
                ids, rid = pending.pop(0)
                seqs[rid] = engine.add_request(ids, params, mode, request_id=rid)
            for out in engine.step():
                ts = streams[out.request_id]
                if ts is not None:
                    ts.push(out.new_token_ids, out.finished)
                    if ts.stopped and not out.finished:
                        engine.abort(out.request_id)
                if out.finished or (ts is not None and ts.stopped):
                    seq = out.sequence
                    reason = "stop" if ts is not None and ts.stopped else out.finish_reason
                    done[out.request_id] = Completion(
                        out.request_id, ts.text if ts is not None else "", list(seq.output_ids), reason,
                        len(seq.prompt_ids), seq.forwards, seq.drafted, seq.accepted, seq.options, seq.ttft,
                        seq.tpot)
                    bar.update()
        bar.close()
        return [done[rid] for rid in seqs]
