"""Evaluation tasks: questions with references and a scorer, from generators or files, all offline.

A task spec names the source:

- ``arithmetic`` (or ``arithmetic:DIGITS``): the project's seeded toy additions (``flare.data.arithmetic``),
  answered ``Answer: N`` or ``\\boxed{N}``;
- ``reasoning_gym:TASK`` or ``reasoning_gym:TASK?key=value&key=value``: a ``reasoning-gym`` generator (e.g.
  ``basic_arithmetic``, ``chain_sum``, ``gsm_symbolic``) with its default settings or the given ones (fields of
  the task's config, e.g. ``reasoning_gym:products?min_digits=1&max_digits=1``; values read as JSON numbers and
  booleans, else strings), scored by its own ``score_answer`` on the answer a reader would take
  (``flare.eval.answers.stated_answer``: ``Answer: X`` / ``\\boxed{X}``, else "the answer is X", else the last
  number when the reference is a number);
- a path to a JSONL file: GSM8K format (``{"question", "answer": "... #### N"}``, the question sent with the
  paper's zero-shot "reason step by step ... \\boxed{}" instruction and the final number scored), or chat rows
  with an ``answer`` key (``{"messages": [{"role": "user", ...}, ...], "answer": "N"}``, as the toy data is
  written). Malformed rows are skipped and reported with their line numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flare.eval.answers import final_number, gsm8k_reference, is_number, same_number, score, stated_answer

GSM8K_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class EvalItem:
    question: str  # the user message
    reference: str
    scorer: Callable[[str], float]  # response -> score in [0, 1]


@dataclass
class Task:
    name: str
    items: list[EvalItem]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line number, why) of malformed rows


def load_task(spec: str, limit: int | None = None, seed: int = 0) -> Task:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    count = limit or 100
    if spec == "arithmetic" or spec.startswith("arithmetic:"):
        return _arithmetic(spec, count, seed)
    if spec.startswith("reasoning_gym:"):
        return _reasoning_gym(spec.split(":", 1)[1], count, seed)
    path = Path(spec)
    if path.suffix == ".jsonl" or path.exists():
        task = _jsonl(path)
        task.items = task.items[:limit] if limit else task.items
        return task
    raise ValueError(f"unknown task {spec!r}: use 'arithmetic[:DIGITS]', 'reasoning_gym:TASK' or a JSONL path")


def _strict(reference: str) -> Callable[[str], float]:
    return lambda response: float(score(response, reference))


def _arithmetic(spec: str, count: int, seed: int) -> Task:
    from flare.data.arithmetic import generate_rows

    digits = int(spec.split(":", 1)[1]) if ":" in spec else 2
    # Seeds apart from any training data's (the demo trains on seed 0 and holds out seed + 1000).
    rows = generate_rows(count, seed + 1000, max_digits=digits)
    return Task(spec, [EvalItem(r["messages"][0]["content"], r["answer"], _strict(r["answer"])) for r in rows])


def task_settings(text: str) -> dict[str, object]:
    """``key=value&key=value`` -> kwargs; values parsed as JSON scalars (1, 0.5, true), else kept as strings."""
    settings: dict[str, object] = {}
    for part in filter(None, text.split("&")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"task setting {part!r} is not key=value")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def _reasoning_gym(spec: str, count: int, seed: int) -> Task:
    try:
        import reasoning_gym
    except ImportError as e:
        raise ModuleNotFoundError("reasoning_gym is not installed: pip install 'flare-lm[eval]'") from e
    name, _, query = spec.partition("?")
    settings = task_settings(query)
    try:
        data = reasoning_gym.create_dataset(name, size=count, seed=seed, **settings)
    except TypeError as e:  # a key the task's config does not have
        raise ValueError(f"reasoning_gym:{name} does not take the settings {sorted(settings)}: {e}") from None

    def scorer(entry):
        numeric = is_number(str(entry["answer"]))

        def run(response: str) -> float:
            return float(data.score_answer(stated_answer(response, numeric), entry) or 0.0)
        return run

    items = [EvalItem(e["question"] + "\nGive the final answer as 'Answer: <answer>'.", str(e["answer"]), scorer(e))
             for e in data]
    return Task(f"reasoning_gym:{spec}", items)


def _jsonl(path: Path) -> Task:
    if not path.exists():
        raise FileNotFoundError(f"no such task file: {path}")
    items, skipped = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(_row(json.loads(line)))
        except json.JSONDecodeError as e:
            skipped.append((n, f"not JSON ({e.msg})"))
        except (ValueError, TypeError, KeyError) as e:
            skipped.append((n, str(e)))
    if not items:
        detail = "; ".join(f"line {n}: {why}" for n, why in skipped[:5])
        raise ValueError(f"{path}: no usable rows" + (f" ({detail})" if detail else ""))
    return Task(str(path), items, skipped)


def _row(row) -> EvalItem:
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    if "question" in row:
        question, answer = row["question"], row.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("'question' must be non-empty text")
        if not isinstance(answer, str):
            raise ValueError("'answer' must be text ending in '#### <number>'")
        ref = gsm8k_reference(answer)
        return EvalItem(f"{question}\n{GSM8K_INSTRUCTION}", ref,
                        lambda response, ref=ref: float(same_number(final_number(response), ref)))
    if "messages" in row and "answer" in row:
        users = [m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[0], str):
            raise ValueError("no user message")
        return EvalItem(users[0], str(row["answer"]), _strict(str(row["answer"])))
    raise ValueError("expected {'question', 'answer'} (GSM8K) or {'messages', 'answer'}")
