"""Stage ``survey``: the seed's greedy (causal) accuracy on candidate reasoning-gym tasks, to choose the tasks
(accuracy >= 30%) for later evaluation and transfer.

Through the project's evaluation path: ``flare.eval.load_task("reasoning_gym:SPEC", problems, seed)`` (the
task's own question at its default difficulty or the spec's settings, plus "Give the final answer as 'Answer:
<answer>'.") and ``flare.eval.evaluate`` (the chat template, the engine's batches, the task's ``score_answer`` on
the answer a reader takes from the response: ``flare.eval.answers.stated_answer``), in float32 with
``MAX_NUM_SEQS`` slots. Each task's result and responses go to ``OUT/survey/TASK.json`` (``file_name``) as it
finishes (a killed survey resumes at the next task); ``OUT/survey.json`` collects them. Done when
``OUT/survey.json`` exists for the same plan (tasks, problems, seeds, token budgets, answer reader). ``--quick`` (2
tasks x 8 problems) writes ``OUT/survey-quick.json`` and ``OUT/survey-quick/`` instead, leaving the full survey's alone.

``accuracy`` is the harness's: the mean task score, which includes reasoning-gym's partial credit (by default a
wrong answer that contains the reference scores len(reference) / len(answer)); ``exact``: the share scored 1;
``kept``: accuracy >= ``KEEP``. ``lenient_exact`` is a diagnostic of answer format only: the share scored 1 when
the answer may also be read the ways of ``lenient_candidates``; it never keeps a task. ``capped``: the share of
responses as long as ``max_new_tokens`` (re-encoded).
"""

from __future__ import annotations

import re
import time
from typing import Callable

from recipes.smollm2.common import DTYPE, SEEDS, Run, read_json, remove_temporaries, seed_for, write_json

MAX_NUM_SEQS = 16  # engine slots; 32 basic_arithmetic problems on 2 busy cores: 16 ~87 new tok/s, 8 ~74, 32 ~21
KEEP = 0.30
READER = "flare.eval.answers.stated_answer"  # how answers are read: in the plan, so a change of reader resurveys
# reasoning-gym task spec -> max_new_tokens, sized on the probe seeds to the seed's usual answer length. First
# every task at its default difficulty, then easier settings of the tasks where the seed came closest on the
# probe seeds (a spec's settings go to the task's generator: flare.eval.load_task).
TASKS = {"basic_arithmetic": 128, "chain_sum": 96, "products": 96, "gcd": 64, "lcm": 96, "simple_equations": 160,
         "gsm_symbolic": 256, "count_bits": 128, "base_conversion": 128, "fraction_simplification": 96,
         "leg_counting": 64, "letter_counting": 64, "number_sorting": 160, "spell_backward": 48,
         "word_sorting": 128, "word_sequence_reversal": 128, "isomorphic_strings": 32, "ransom_note": 32,
         "calendar_arithmetic": 96, "family_relationships": 64, "syllogism": 128,
         "products?max_digits=1": 48, "chain_sum?max_terms=2&max_digits=1": 48, "lcm?max_value=10": 64,
         "gcd?max_value=20": 48, "letter_counting?min_words=1&max_words=1": 48, "count_bits?max_n=16": 64,
         "basic_arithmetic?max_terms=2&max_digits=1&allow_parentheses=false&allow_negation=false"
         '&operators=["+","-"]': 48,
         "leg_counting?min_animals=1&max_animals=1&max_instances=3": 48}
PROBLEMS = 40
QUICK_TASKS, QUICK_PROBLEMS = {"gcd": 64, "spell_backward": 48}, 8


def file_name(spec: str) -> str:
    """A task spec as a file name: its settings' punctuation as ``_``."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec).strip("_")


def plan(run: Run) -> list[dict]:
    """The survey's tasks as run: name, problems, generator seed, max_new_tokens."""
    tasks, count = (QUICK_TASKS, QUICK_PROBLEMS) if run.quick else (TASKS, PROBLEMS)
    return [{"task": spec, "problems": count, "seed": seed_for("survey", count), "max_new_tokens": tokens,
             "answer": READER} for spec, tokens in tasks.items()]


_ANSWER_IS = re.compile(r"answer is\s*:?\s*", re.IGNORECASE)


def lenient_candidates(response: str) -> list[str]:
    """Answers a reader would take from a response that does not state ``Answer: X``: the text after the last
    "answer is" (to the line's end, quotes and a final period removed), the last number, the last line."""
    from flare.eval.answers import final_number

    text, out = response.rsplit("</think>", 1)[-1], []
    if found := list(_ANSWER_IS.finditer(text)):
        out.append(text[found[-1].end():].split("\n")[0].strip().rstrip(".").strip("'\"`*").strip())
    if (number := final_number(text)) is not None:
        out.append(number)
    if lines := [line.strip() for line in text.splitlines() if line.strip()]:
        out.append(lines[-1].rstrip("."))
    return out


def recorder(scorer: Callable[[str], float], sink: list, i: int) -> Callable[[str], float]:
    """``scorer`` that also keeps what it scored: (response, score) at ``sink[i]``."""
    def record(response: str) -> float:
        sink[i] = (response, scorer(response))
        return sink[i][1]
    return record


def survey_task(llm, entry: dict) -> dict:
    """One task of the plan: its result row and every response."""
    import reasoning_gym

    from flare.decoding import SamplingParams, parse_modes
    from flare.eval import evaluate, load_task
    from flare.eval.tasks import task_settings

    task = load_task(f"reasoning_gym:{entry['task']}", entry["problems"], entry["seed"])
    name, _, query = entry["task"].partition("?")
    scored: list = [None] * len(task.items)
    for i, item in enumerate(task.items):
        item.scorer = recorder(item.scorer, scored, i)
    params = SamplingParams(temperature=0, max_new_tokens=entry["max_new_tokens"])
    result = evaluate(llm, task, parse_modes("causal"), params, progress=True).results[0]
    data = reasoning_gym.create_dataset(name, size=entry["problems"], seed=entry["seed"], **task_settings(query))
    rows = []
    for item, problem, (response, score) in zip(task.items, data, scored):
        lenient = max([score] + [float(data.score_answer(c, problem) or 0.0) for c in lenient_candidates(response)])
        tokens = len(llm.tokenizer.encode(response))
        rows.append({"question": item.question, "reference": item.reference, "response": response,
                     "score": score, "lenient": lenient, "tokens": tokens})
    n = len(rows)
    return {**entry, "accuracy": result.accuracy, "exact": sum(r["score"] >= 1 for r in rows) / n,
            "lenient_exact": sum(r["lenient"] >= 1 for r in rows) / n, "mean_answer_tokens": result.new_tokens / n,
            "capped": sum(r["tokens"] >= entry["max_new_tokens"] for r in rows) / n,
            "seconds": round(result.seconds, 2), "kept": result.accuracy >= KEEP, "responses": rows}


def done(run: Run) -> bool:
    summary = read_json(run.survey.with_suffix(".json"))
    return summary is not None and summary.get("plan") == plan(run)


def make(run: Run) -> None:
    import torch
    from tqdm.auto import tqdm

    from flare.device import describe
    from flare.engine import EngineConfig
    from flare.engine.llm import LLM

    try:
        import reasoning_gym  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"the survey needs reasoning_gym: pip install 'flare-lm[eval]' ({e})") from None
    if not (run.seed / "config.json").is_file():
        raise SystemExit(f"no seed checkpoint at {run.seed}: run the import stage first (--stages import,survey)")
    folder = run.survey
    folder.mkdir(parents=True, exist_ok=True)
    remove_temporaries(folder, ".*.tmp-*")
    start = time.perf_counter()
    llm = LLM.from_dir(run.seed, dtype=DTYPE, config=EngineConfig(max_num_seqs=MAX_NUM_SEQS))
    rows = []
    for entry in tqdm(plan(run), desc="survey", unit="task"):
        path = folder / f"{file_name(entry['task'])}.json"
        row = read_json(path)
        if row is None or {k: row.get(k) for k in entry} != entry:
            row = survey_task(llm, entry)
            write_json(path, row)
        rows.append({k: v for k, v in row.items() if k != "responses"})
        tqdm.write(f"  {entry['task']}: accuracy {row['accuracy']:.3f} ({row['seconds']:.0f} s)")
    write_json(folder.with_suffix(".json"), {
        "seed_checkpoint": str(run.seed), "device": describe(llm.model.device, llm.model.dtype, llm.model),
        "threads": torch.get_num_threads(), "max_num_seqs": MAX_NUM_SEQS, "keep_threshold": KEEP,
        "seed_ranges": SEEDS, "plan": plan(run), "tasks": rows, "kept": [r["task"] for r in rows if r["kept"]],
        "seconds": round(time.perf_counter() - start, 1)})
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| task | problems | accuracy | exact | lenient exact | mean answer tokens / max | capped | s | kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["accuracy"]):
        lines.append(f"| {r['task']} | {r['problems']} | {100 * r['accuracy']:.1f}% | {100 * r['exact']:.1f}% | "
                     f"{100 * r['lenient_exact']:.1f}% | {r['mean_answer_tokens']:.0f} / {r['max_new_tokens']} | "
                     f"{100 * r['capped']:.0f}% | {r['seconds']:.0f} | {'yes' if r['kept'] else 'no'} |")
    return "\n".join(lines)


