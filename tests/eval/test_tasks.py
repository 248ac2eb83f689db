"""Task sources: the toy generator, reasoning-gym, user GSM8K files (malformed rows reported by line)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from flare.eval import load_task
from flare.eval.answers import final_number, gsm8k_reference, same_number


def test_gsm8k_file_with_malformed_rows(tmp_path):
    rows = [
        json.dumps({"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}),
        "{not json",
        json.dumps({"question": "No answer line", "answer": "it is 5"}),
        "",
        json.dumps(["a", "list"]),
        json.dumps({"question": "Big", "answer": "#### 1,234"}),
        json.dumps({"question": "", "answer": "#### 1"}),
    ]
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(rows) + "\n")
    task = load_task(str(path))
    assert [i.reference for i in task.items] == ["7", "1234"]
    assert [n for n, _ in task.skipped] == [2, 3, 5, 7]
    assert "not JSON" in task.skipped[0][1] and "####" in task.skipped[1][1]
    assert "\\boxed{}" in task.items[0].question
    score = task.items[0].scorer
    assert score("so \\boxed{7}") == 1.0 and score("The answer is 7.") == 1.0 and score("7.0") == 1.0
    assert score("\\boxed{8} but 7") == 0.0 and score("no idea") == 0.0
    assert task.items[1].scorer("Answer: 1,234") == 1.0
    assert len(load_task(str(path), limit=1).items) == 1


def test_a_file_with_no_usable_row_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"q": 1}\n[]\n')
    with pytest.raises(ValueError, match="line 1"):
        load_task(str(path))
    with pytest.raises(FileNotFoundError):
        load_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mystery")


def test_chat_rows_with_answers_and_the_generator(tmp_path):
    task = load_task("arithmetic:2", limit=5, seed=3)
    again = load_task("arithmetic:2", limit=5, seed=3)
    assert len(task.items) == 5
    assert [(i.question, i.reference) for i in task.items] == [(i.question, i.reference) for i in again.items]
    item = task.items[0]
    assert item.scorer(f"Answer: {item.reference}") == 1.0 and item.scorer(item.reference) == 0.0  # stated only
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1"},
                                             {"role": "assistant", "content": "Answer: 2"}], "answer": "2"}) + "\n")
    assert load_task(str(path)).items[0].question == "1+1"


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning_gym not installed")
def test_reasoning_gym_task_uses_its_own_scorer():
    task = load_task("reasoning_gym:basic_arithmetic", limit=4, seed=1)
    assert len(task.items) == 4
    for item in task.items:
        assert item.scorer(f"Answer: {item.reference}") == 1.0
        assert item.scorer("Answer: banana") == 0.0


def test_answer_helpers():
    assert final_number("x = 3, then 4,500 items") == "4500"
    assert final_number("Answer: 12 and later 13") == "12"
    assert same_number("18.0", "18") and not same_number(None, "1") and same_number("abc", "abc")
    with pytest.raises(ValueError, match="####"):
        gsm8k_reference("42")


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning_gym not installed")
def test_reasoning_gym_task_settings_reach_its_generator():
    task = load_task("reasoning_gym:products?min_digits=1&max_digits=1&allow_negation=false", limit=12, seed=3)
    assert task.name == "reasoning_gym:products?min_digits=1&max_digits=1&allow_negation=false"
    for item in task.items:  # one-digit factors only
        product = item.question.split(":", 1)[1].split(".", 1)[0]
        assert all(len(f.strip()) == 1 for f in product.split("*")), item.question
    assert load_task("reasoning_gym:products", limit=12, seed=3).items[0].question != task.items[0].question
    with pytest.raises(ValueError, match="does not take the settings"):
        load_task("reasoning_gym:products?bogus=1", limit=2)
    with pytest.raises(ValueError, match="not key=value"):
        load_task("reasoning_gym:products?max_digits", limit=2)


def test_stated_answer_reads_free_form_replies():
    from flare.eval.answers import is_number, stated_answer

    assert stated_answer("so \\boxed{12}. The answer is 13", numeric=True) == "12"
    assert stated_answer("Answer: 7", numeric=True) == "7"
    assert stated_answer("Answer: anyone, format", numeric=False) == "anyone, format"
    assert stated_answer("4 * 7 = 28\nThe answer is 28.", numeric=True) == "28"
    assert stated_answer("The LCM of 5 and 4 is 20.", numeric=True) == "20"
    assert stated_answer("The answer is: tnev.", numeric=False) == "tnev"
    assert stated_answer("The answer is 'True'", numeric=False) == "True"
    assert stated_answer("I cannot say", numeric=True) == "I cannot say"
    assert stated_answer("<think>5</think>no idea", numeric=True) == "no idea"
    assert is_number(" -4,500 ") and is_number("0.5") and not is_number("4 and 5") and not is_number("x")


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning_gym not installed")
def test_reasoning_gym_scores_what_a_reader_takes_as_the_answer():
    task = load_task("reasoning_gym:products?max_digits=1", limit=3, seed=5)
    for item in task.items:
        assert item.scorer(f"3 * 3 = 9, so the answer is {item.reference}.") == 1.0
        assert item.scorer(f"The product is {item.reference}") == 1.0
        assert item.scorer(f"The answer is {int(item.reference) + 1}. ({item.reference} was a guess)") == 0.0
