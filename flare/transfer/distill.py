"""Self-distilled transfer data: the seed model's own answers to prompts, through the batched engine.

Prompt rows may be chat rows (everything up to the last user turn is kept; existing assistant answers are
replaced), ``{"prompt": ...}`` or ``{"question": ...}`` rows. Each output row is a training row
(``{"messages": [..., assistant]}``, a leading think block moved to ``reasoning_content``) that records how it
was produced under ``"distill"``; an ``answer`` key is carried over. With a verifier, a row is kept only when
its answer checks out (``strict``: the stated ``Answer: N`` / ``\\boxed{N}``; ``number``: GSM8K-style final
number). Answers cut off by the length limit are dropped: they would teach truncation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

from flare.data.think import split_think, think_tag_problem
from flare.decoding import SamplingParams
from flare.engine.llm import LLM
from flare.eval.answers import final_number, same_number, score

VERIFIERS = ("none", "strict", "number")


@dataclass
class DistillConfig:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    seed: int = 0
    mode: str = "causal"
    verify: str = "none"

    def __post_init__(self) -> None:
        if self.verify not in VERIFIERS:
            raise ValueError(f"verify must be one of {VERIFIERS}, got {self.verify!r}")


def prompt_messages(row: Any) -> list[dict[str, str]]:
    """The conversation to answer: up to and including the last user turn."""
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    if isinstance(row.get("messages"), list):
        msgs = [m for m in row["messages"] if isinstance(m, dict)]
        last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=None)
        if last_user is None:
            raise ValueError("no user turn")
        out = [{"role": m["role"], "content": m.get("content")} for m in msgs[: last_user + 1]]
    elif isinstance(row.get("prompt"), str):
        out = ([{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []) + [
            {"role": "user", "content": row["prompt"]}]
    elif isinstance(row.get("question"), str):
        out = [{"role": "user", "content": row["question"]}]
    else:
        raise ValueError("expected 'messages', 'prompt' or 'question'")
    if any(not isinstance(m["content"], str) or not m["content"].strip() for m in out):
        raise ValueError("a turn has no text")
    return out


def _verified(response: str, answer: str, how: str) -> bool:
    if how == "strict":
        return score(response, answer)
    return same_number(final_number(response), answer.rsplit("####", 1)[-1].strip().replace(",", ""))


def distill_rows(llm: LLM, rows: Iterable[tuple[int, Any]], config: DistillConfig, *, progress: bool = True,
                 check: Callable[[int, str], bool] | None = None
                 ) -> tuple[list[dict[str, Any]], dict[str, int], list[tuple[int, str]]]:
    """Returns (output rows, counts of kept/dropped by reason, (line, why) of unusable prompt rows). ``check``
    (line, response) -> keep, when given, replaces ``config.verify``: a task's own scorer, for instance."""
    items, bad = [], []
    for line, row in rows:
        try:
            items.append((line, row, prompt_messages(row)))
        except ValueError as e:
            bad.append((line, str(e)))
    if check is None and config.verify != "none" and any("answer" not in row for _, row, _ in items):
        raise ValueError(f"--verify {config.verify} needs an 'answer' in every prompt row")
    params = SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                            max_new_tokens=config.max_tokens, seed=config.seed)
    prompts = [llm.chat_ids(msgs) for _, _, msgs in items]
    done = llm.generate(prompts, params, config.mode, progress="distill" if progress else None)
    counts = {"kept": 0, "truncated": 0, "bad_think_tags": 0, "wrong_answer": 0, "empty": 0}
    out = []
    record = {**asdict(config), "model": llm.name}
    for (line, row, msgs), c in zip(items, done):
        if c.finish_reason != "stop":
            counts["truncated"] += 1
            continue
        if think_tag_problem(c.text) is not None:
            counts["bad_think_tags"] += 1
            continue
        reasoning, content = split_think(c.text)
        if not content.strip():
            counts["empty"] += 1
            continue
        right = check(line, c.text) if check is not None else (
            config.verify == "none" or _verified(c.text, str(row["answer"]), config.verify))
        if not right:
            counts["wrong_answer"] += 1
            continue
        turn = {"role": "assistant", "content": content.strip()}
        if reasoning and reasoning.strip():
            turn["reasoning_content"] = reasoning.strip()
        new = {"messages": msgs + [turn], "distill": {**record, "source_line": line}}
        if "answer" in row:
            new["answer"] = row["answer"]
        out.append(new)
        counts["kept"] += 1
    return out, counts, bad
