"""Which reasoning-gym tasks the conversion learns from and which it is only tested on.

Both lists were fixed on the probe seeds, before the survey ran: the easier settings of the tasks where the seed
came closest to answering (``survey.TASKS``). A task takes part only when the survey kept it (the seed's
accuracy >= ``survey.KEEP`` on the survey seeds); ``--quick`` takes the first of each list without that gate,
so that every stage runs in seconds whatever the seed can do.
"""

from __future__ import annotations

from recipes.smollm2 import survey
from recipes.smollm2.common import Run, read_json

# In the transfer data, and evaluated on held-out problems (other generator seeds, no shared question text).
TRANSFER = ["products?max_digits=1", "chain_sum?max_terms=2&max_digits=1", "lcm?max_value=10",
            "letter_counting?min_words=1&max_words=1"]
# Never in the transfer data: evaluated only.
HELD_OUT = ["gcd?max_value=20",
            "basic_arithmetic?max_terms=2&max_digits=1&allow_parentheses=false&allow_negation=false"
            '&operators=["+","-"]']


def chosen(run: Run) -> dict[str, list[str]]:
    """``{"transfer": [...], "held_out": [...]}``: the specs that take part in this run."""
    if run.quick:
        return {"transfer": TRANSFER[:1], "held_out": HELD_OUT[:1]}
    summary = read_json(run.survey.with_suffix(".json"))
    if summary is None:
        raise SystemExit(f"no survey at {run.survey}.json: run the survey stage first")
    kept = set(summary["kept"])
    picked = {"transfer": [t for t in TRANSFER if t in kept], "held_out": [t for t in HELD_OUT if t in kept]}
    if not picked["transfer"]:
        raise SystemExit(f"the survey kept none of the transfer tasks {TRANSFER}: nothing to distill from")
    return picked


def max_new_tokens(spec: str) -> int:
    """The survey's token budget of ``spec``: the seed's usual answer length, sized on the probe seeds."""
    return survey.TASKS[spec]


EVAL_PROBLEMS, QUICK_EVAL_PROBLEMS = 48, 4  # per task, from the reserved eval seeds


def eval_task(run: Run, spec: str, problems: int | None = None):
    """``spec``'s evaluation problems (``flare.eval.Task``), from the reserved eval seeds."""
    from flare.eval import load_task
    from recipes.smollm2.common import seed_for

    count = problems or (QUICK_EVAL_PROBLEMS if run.quick else EVAL_PROBLEMS)
    return load_task(f"reasoning_gym:{spec}", count, seed_for("eval", count))
