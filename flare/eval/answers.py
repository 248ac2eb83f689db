"""Final-answer extraction and scoring: ``\\boxed{N}``, ``Answer: N``, GSM8K's ``#### N``."""

from __future__ import annotations

import re

_NUMBER = r"(-?\d[\d,]*(?:\.\d+)?)"
_FINAL = (re.compile(r"\\boxed\{\s*" + _NUMBER + r"\s*\}"), re.compile(r"Answer:\s*" + _NUMBER))


def extract_answer(response: str) -> str | None:
    """The final answer of a response: the last ``\\boxed{N}``, else the last ``Answer: N`` (after any think
    block); commas removed. None when the response states no final answer (a bare number does not count)."""
    text = response.rsplit("</think>", 1)[-1]
    for pattern in _FINAL:
        found = pattern.findall(text)
        if found:
            return found[-1].replace(",", "")
    return None


def score(response: str, answer: int | str) -> bool:
    """True iff the response's final answer equals ``answer``."""
    return extract_answer(response) == str(answer).replace(",", "").strip()


_ANY_NUMBER = re.compile(_NUMBER)


def final_number(response: str) -> str | None:
    """A stated final answer (``extract_answer``), else the last number in the response (GSM8K-style lenient
    extraction for models that do not box their answer)."""
    stated = extract_answer(response)
    if stated is not None:
        return stated
    found = _ANY_NUMBER.findall(response.rsplit("</think>", 1)[-1])
    return found[-1].replace(",", "") if found else None


def same_number(a: str | None, b: str) -> bool:
    """Numeric equality when both parse (``18.0 == 18``), else exact text."""
    if a is None:
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip() == b.strip()


def gsm8k_reference(answer: str) -> str:
    """The number after ``####`` in a GSM8K answer field; ValueError when there is none."""
    if "####" not in answer:
        raise ValueError("the answer has no '#### <number>' line")
    ref = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not ref:
        raise ValueError("nothing follows '####' in the answer")
    return ref
