"""The toy arithmetic recipe: deterministic, correct worked solutions in both styles, a strict scorer."""

from __future__ import annotations

import importlib.util
import re

import pytest

from flare.data import PackedDataset, read_jsonl
from flare.data.arithmetic import (Problem, column_solution, generate_rows, make_problems, number_words,
                                   offdist_solution, reasoning_gym_rows)
from flare.eval.answers import extract_answer, score
from recipes.arithmetic import main


def test_generator_is_deterministic_for_a_seed():
    rows = generate_rows(50, seed=3, ops="+-", max_digits=4)
    assert rows == generate_rows(50, seed=3, ops="+-", max_digits=4)
    assert rows != generate_rows(50, seed=4, ops="+-", max_digits=4)
    # The off-distribution variant poses the same problems.
    off = generate_rows(50, seed=3, ops="+-", max_digits=4, style="offdist")
    assert [r["messages"][0] for r in off] == [r["messages"][0] for r in rows]
    assert [r["answer"] for r in off] == [r["answer"] for r in rows]


def test_worked_solutions_exact():
    assert Problem(47, 38, "+").question == "What is 47+38?"
    assert column_solution(Problem(47, 38, "+")) == "7+8=15, carry 1. 4+3+1=8. Answer: 85"
    assert column_solution(Problem(95, 17, "+")) == "5+7=12, carry 1. 9+1+1=11, carry 1. Answer: 112"
    assert column_solution(Problem(52, 38, "-")) == "2-8+10=4, borrow 1. 5-3-1=1. Answer: 14"
    assert offdist_solution(Problem(47, 38, "+")) == (
        "Add by place value, largest first: 47+30=77, 77+8=85. The sum is eighty-five, "
        "so the answer is \\boxed{85}.")
    assert [number_words(n) for n in (0, 13, 85, 100, 1203, 2_000_019)] == [
        "zero", "thirteen", "eighty-five", "one hundred", "one thousand two hundred three",
        "two million nineteen"]


def test_problems_respect_digits_and_subtraction_is_nonnegative():
    for p in make_problems(300, seed=0, min_digits=2, max_digits=3, ops="+-"):
        assert 10 <= p.a < 1000 and 10 <= p.b < 1000 and p.answer >= 0
    with pytest.raises(ValueError):
        make_problems(1, 0, ops="*")
    with pytest.raises(ValueError):
        make_problems(1, 0, min_digits=3, max_digits=2)


@pytest.mark.parametrize("style", ["steps", "offdist"])
def test_scorer_accepts_every_generated_solution_and_rejects_wrong_ones(style):
    for row in generate_rows(200, seed=1, style=style, ops="+-", max_digits=5):
        question, response, answer = row["messages"][0]["content"], row["messages"][1]["content"], row["answer"]
        a, op, b = re.fullmatch(r"What is (\d+)([+-])(\d+)\?", question).groups()
        assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert score(response, answer)
        assert not score(response, int(answer) + 1)


def test_extract_answer_rules():
    assert extract_answer("<think>\nAnswer: 3\n</think>\n\nAnswer: 1,234") == "1234"  # after the think block
    assert extract_answer("Answer: 5 ... \\boxed{7}") == "7"  # boxed wins
    assert extract_answer("Answer: 5. Answer: 6.") == "6"  # the last one
    assert extract_answer("7+8=15") is None and not score("85", 85)  # a bare number is not a final answer
    assert score("\\boxed{ -3 }", -3)


def test_rows_render_and_pack(tmp_path, char_tok):
    path = tmp_path / "add.jsonl"
    assert main(["--out", str(path), "--count", "40", "--seed", "2", "--ops", "+-"]) == 0
    rows = [r for _, r in read_jsonl(path)]
    assert rows == generate_rows(40, seed=2, ops="+-")
    ds = PackedDataset.from_jsonl(path, char_tok, seq_len=120, block_size=3)
    assert ds.stats["documents"] == 40
    assert char_tok.token_id("<|unk|>") not in ds.input_ids.unique().tolist()
    assert ds.loss_mask.sum().item() == ds.stats["supervised_tokens"] > 0
    # Every supervised token is in an assistant body: the supervised text is exactly the solutions.
    text = char_tok.decode(ds.input_ids[ds.loss_mask].tolist(), skip_special_tokens=False)
    for row in rows:
        assert f"<think>\n\n</think>\n\n{row['messages'][1]['content']}<|im_end|>" in text
    assert text.count("<|im_end|>") == 40 and "What is" not in text


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning_gym not installed")
def test_reasoning_gym_rows():
    rows = reasoning_gym_rows("chain_sum", 5, seed=0)
    assert len(rows) == 5 and rows == reasoning_gym_rows("chain_sum", 5, seed=0)
    assert all(score(r["messages"][1]["content"], r["answer"]) for r in rows)


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is not None, reason="reasoning_gym installed")
def test_reasoning_gym_absent_is_a_clean_skip(tmp_path, capsys):
    with pytest.raises(ModuleNotFoundError, match="reasoning_gym"):
        reasoning_gym_rows("chain_sum", 5)
    assert main(["--out", str(tmp_path / "rg.jsonl"), "--reasoning-gym", "chain_sum"]) == 0
    assert "skipped" in capsys.readouterr().err and not (tmp_path / "rg.jsonl").exists()
