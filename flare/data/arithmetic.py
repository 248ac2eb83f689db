"""Toy arithmetic chat data: seeded multi-digit addition/subtraction with short worked solutions.

Two answer styles over the same problems, to measure distribution match (method §5):
- ``steps`` (in-distribution): column arithmetic, right to left, ending ``Answer: 85``;
- ``offdist``: place values left to right, the result in words, ending ``\\boxed{85}``.

Rows are ``{"messages": [user, assistant], "answer": "85"}`` (the extra key lets evaluation score a file);
``flare.eval.answers.score`` checks a response against it. ``python -m recipes.arithmetic`` writes a file.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

STYLES = ("steps", "offdist")
MAX_DIGITS = 12  # the number-words helper names values below 10**15

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ("", " thousand", " million", " billion", " trillion")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str  # "+" or "-" (then a >= b)

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def question(self) -> str:
        return f"What is {self.a}{self.op}{self.b}?"


def _operand(rng: random.Random, min_digits: int, max_digits: int) -> int:
    k = rng.randint(min_digits, max_digits)
    return rng.randint(0 if k == 1 else 10 ** (k - 1), 10 ** k - 1)


def make_problems(count: int, seed: int, *, min_digits: int = 1, max_digits: int = 3,
                  ops: str = "+") -> list[Problem]:
    """``count`` problems; each operand has a uniform number of digits in [min_digits, max_digits]."""
    if not 1 <= min_digits <= max_digits <= MAX_DIGITS:
        raise ValueError(f"need 1 <= min_digits <= max_digits <= {MAX_DIGITS}")
    if not ops or set(ops) - {"+", "-"}:
        raise ValueError(f"ops must be made of '+' and '-', got {ops!r}")
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        op = rng.choice(ops)
        a, b = _operand(rng, min_digits, max_digits), _operand(rng, min_digits, max_digits)
        if op == "-" and a < b:
            a, b = b, a
        problems.append(Problem(a, b, op))
    return problems


def _digits(n: int, width: int) -> list[int]:
    """Digits of n, least significant first, zero-padded to ``width``."""
    return [int(c) for c in reversed(str(n).rjust(width, "0"))]


def column_solution(p: Problem) -> str:
    """Right-to-left column arithmetic: ``7+8=15, carry 1. 4+3+1=8. Answer: 85``."""
    width = max(len(str(p.a)), len(str(p.b)))
    steps, carry = [], 0
    for da, db in zip(_digits(p.a, width), _digits(p.b, width)):
        expr = f"{da}{p.op}{db}" + (f"{p.op}{carry}" if carry else "")
        if p.op == "+":
            s = da + db + carry
            steps.append(f"{expr}={s}" + (", carry 1" if s >= 10 else ""))
            carry = s // 10
        else:
            d = da - db - carry
            steps.append(f"{expr}+10={d + 10}, borrow 1" if d < 0 else f"{expr}={d}")
            carry = int(d < 0)
    return ". ".join(steps) + f". Answer: {p.answer}"


def number_words(n: int) -> str:
    """English words for an integer: 85 -> ``eighty-five``, 1203 -> ``one thousand two hundred three``."""
    if n < 0:
        return "minus " + number_words(-n)
    if n == 0:
        return "zero"
    groups = []
    for scale in _SCALES:
        n, part = divmod(n, 1000)
        if part:
            hundreds, rest = divmod(part, 100)
            words = [f"{_ONES[hundreds]} hundred"] if hundreds else []
            if rest:
                tens, ones = divmod(rest, 10)
                words.append(_ONES[rest] if rest < 20 else _TENS[tens] + (f"-{_ONES[ones]}" if ones else ""))
            groups.append(" ".join(words) + scale)
        if not n:
            break
    if n:
        raise ValueError("number too large to name")
    return " ".join(reversed(groups))


def offdist_solution(p: Problem) -> str:
    """Left-to-right place values from the first operand, the result in words, then ``\\boxed{}``."""
    width = len(str(p.b))
    parts = [d * 10 ** i for i, d in reversed(list(enumerate(_digits(p.b, width)))) if d] or [0]
    total, steps = p.a, []
    for part in parts:
        new = total + part if p.op == "+" else total - part
        steps.append(f"{total}{p.op}{part}={new}")
        total = new
    kind = "sum" if p.op == "+" else "difference"
    verb = "Add" if p.op == "+" else "Subtract"
    return (f"{verb} by place value, largest first: {', '.join(steps)}. "
            f"The {kind} is {number_words(p.answer)}, so the answer is \\boxed{{{p.answer}}}.")


def to_row(p: Problem, style: str = "steps") -> dict[str, Any]:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    solution = column_solution(p) if style == "steps" else offdist_solution(p)
    return {"messages": [{"role": "user", "content": p.question}, {"role": "assistant", "content": solution}],
            "answer": str(p.answer)}


def generate_rows(count: int, seed: int = 0, *, style: str = "steps", min_digits: int = 1, max_digits: int = 3,
                  ops: str = "+") -> list[dict[str, Any]]:
    """Chat rows for ``make_problems(count, seed, ...)``; same seed and settings, same problems in any style."""
    problems = make_problems(count, seed, min_digits=min_digits, max_digits=max_digits, ops=ops)
    return [to_row(p, style) for p in problems]


def reasoning_gym_rows(task: str, count: int, seed: int = 0, **config: Any) -> list[dict[str, Any]]:
    """Rows from a ``reasoning_gym`` task (e.g. ``basic_arithmetic``, ``chain_sum``), answered ``Answer: X``.

    Raises ModuleNotFoundError when reasoning_gym is not installed (it is optional and never installed here).
    """
    try:
        import reasoning_gym
    except ImportError as e:
        raise ModuleNotFoundError("reasoning_gym is not installed (pip install reasoning-gym)") from e
    data = reasoning_gym.create_dataset(task, size=count, seed=seed, **config)
    return [{"messages": [{"role": "user", "content": entry["question"]},
                          {"role": "assistant", "content": f"Answer: {entry['answer']}"}],
             "answer": str(entry["answer"])} for entry in data]
