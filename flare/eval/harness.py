"""Accuracy per decoding mode, through the batched engine, with the speed it took.

For each mode: every question goes through the model's chat template and the engine (batched up to its slots),
and the report gives accuracy, tokens per forward (tokens a request gained per forward it took part in),
tokens/s (all new tokens over the mode's wall time), agreement with causal decoding (the share of questions
whose tokens are identical to the causal ones) and, for AR-Trust, accepted/drafted.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from flare.decoding import ModeOptions, SamplingParams
from flare.engine.compiled import warm_modes
from flare.engine.llm import LLM
from flare.eval.tasks import Task


@dataclass
class ModeResult:
    mode: str
    options: dict[str, Any]  # as run: resolved against the checkpoint
    accuracy: float
    tokens_per_forward: float
    tokens_per_s: float
    new_tokens: int
    seconds: float
    same_as_causal: float | None = None
    acceptance: float | None = None
    examples: list[dict[str, str]] = field(default_factory=list)
    # Means over the questions (seconds): to the first output, and per output token after it (``Sequence.ttft``
    # and ``.tpot``). TPOT leaves the prompt's prefill out, and with it the first step or round: on answers of a
    # few rounds its ratios are not the decoding's alone (converted SmolLM2, ~12-token answers: AR-Trust 1.5-1.6x
    # causal in TPOT where it was 1.8-1.9x in tokens/s).
    ttft: float | None = None
    tpot: float | None = None
    # Per question, when asked for (``evaluate(..., keep_outputs=True)``): score, forwards taken part in, new
    # token ids, response text.
    scores: list[float] | None = None
    forwards: list[int] | None = None
    token_ids: list[list[int]] | None = None
    responses: list[str] | None = None

    @property
    def label(self) -> str:
        """``mode:key=value...`` as ``flare eval --modes`` reads it."""
        return ":".join([self.mode, *(f"{k}={v}" for k, v in self.options.items())])


@dataclass
class EvalReport:
    task: str
    model: str
    questions: int
    skipped_rows: list[tuple[int, str]]
    results: list[ModeResult]
    not_run: dict[str, str] = field(default_factory=dict)  # mode -> why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def result(self, mode: str) -> ModeResult | None:
        return next((r for r in self.results if r.mode == mode), None)


def evaluate(llm: LLM, task: Task, modes: list[ModeOptions], params: SamplingParams,
             progress: bool = True, keep_outputs: bool = False) -> EvalReport:
    if llm.tokenizer is None:
        raise ValueError("evaluation needs a model directory with a tokenizer.json")
    prompts = [llm.chat_ids([{"role": "user", "content": item.question}]) for item in task.items]
    report = EvalReport(task.name, llm.name, len(task.items), task.skipped, [])
    causal_ids: list[list[int]] | None = None
    # Causal first, so every other mode can be compared with it.
    ordered = sorted(modes, key=lambda m: m.mode != "causal")
    for options in ordered:
        mode = options.mode
        if options.needs_mask and llm.model.config.mask_token_id is None:
            report.not_run[options.label()] = "needs a FLARE checkpoint (no mask token): run `flare convert` and train"
            continue
        # Untimed warm-up (first-call kernel selection and allocation), so that the first mode timed is not the
        # one that pays for it.
        first = prompts[: llm.engine.config.max_num_seqs]
        llm.generate(first, dataclasses.replace(params, max_new_tokens=2), options)
        # Compiled (FLARE_COMPILE): whole requests until they compile nothing, so the timed run waits for no graph:
        # alone, each power of two of slots, a full batch with one more admitted as a slot frees, and for a paced
        # AR-Trust each kind of round its pacer may try (``warm_modes``).
        warm_modes(llm.model, [options], llm.engine.config.max_num_seqs,
                   lambda n, form: llm.generate([prompts[i % len(prompts)] for i in range(n)], params, form))
        llm.engine.reset_prefix_cache()  # each mode's prompts start from no kept beginning (not the warm-up's)
        start = time.perf_counter()
        done = llm.generate(prompts, params, options, progress=options.label() if progress else None)
        seconds = time.perf_counter() - start
        scores = [item.scorer(c.text) for item, c in zip(task.items, done)]
        tokens = sum(len(c.token_ids) for c in done)
        forwards = sum(c.forwards for c in done)
        drafted, accepted = sum(c.drafted for c in done), sum(c.accepted for c in done)
        ids = [c.token_ids for c in done]
        if mode == "causal":
            causal_ids = ids
        report.results.append(ModeResult(
            mode, done[0].options.given(), accuracy=sum(scores) / len(scores),
            tokens_per_forward=tokens / forwards if forwards else 0.0,
            tokens_per_s=tokens / seconds if seconds > 0 else 0.0, new_tokens=tokens, seconds=seconds,
            same_as_causal=None if causal_ids is None else sum(a == b for a, b in zip(ids, causal_ids)) / len(ids),
            acceptance=accepted / drafted if drafted else None, ttft=_mean([c.ttft for c in done]),
            tpot=_mean([c.tpot for c in done]),
            examples=[{"question": task.items[i].question, "response": done[i].text,
                       "reference": task.items[i].reference} for i in range(min(2, len(done)))],
            **(dict(scores=scores, forwards=[c.forwards for c in done], token_ids=ids,
                    responses=[c.text for c in done]) if keep_outputs else {}),
        ))
    return report


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None
