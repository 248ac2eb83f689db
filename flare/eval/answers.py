"""Final-answer extraction and scoring: ``\\boxed{N}``, ``Answer: N``, GSM8K's ``#### N``, and a reader's reading
of free-form replies (``stated_answer``)."""

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


def is_number(text: str) -> bool:
    """``text`` is one number (``-12``, ``4,500``, ``0.5``), surrounding blanks aside."""
    return _ANY_NUMBER.fullmatch(text.strip()) is not None


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


_ANSWER_IS = re.compile(r"answer is\s*:?\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\n|\.(?:\s|$)")


def stated_answer(response: str, numeric: bool) -> str:
    """What a reader takes as a free-form response's answer, first match wins: ``\\boxed{N}`` or ``Answer: N``
    (``extract_answer``); the text after the last ``Answer:``; the sentence after the last "answer is" (for a
    ``numeric`` reference, the last number in it); for a ``numeric`` reference, the response's last number; the
    whole response (after any think block). Small instruction-tuned models often write "The answer is 12." or
    "4 * 7 = 28" however they are asked to format it."""
    text = response.rsplit("</think>", 1)[-1]
    if (found := extract_answer(text)) is not None:
        return found
    if "Answer:" in text:
        return text.rsplit("Answer:", 1)[1].strip()
    if said := list(_ANSWER_IS.finditer(text)):
        sentence = _SENTENCE_END.split(text[said[-1].end():], 1)[0].strip().strip("'\"`*").strip()
        if not numeric:
            return sentence
        if (number := final_number(sentence)) is not None:
            return number
    if numeric and (number := final_number(text)) is not None:
        return number
    return text.strip()
