"""Evaluation: accuracy per decoding mode (tasks, harness), the fixed-output throughput protocol, reports, plots.

``flare eval`` and ``flare bench`` are thin wrappers over ``load_task`` + ``evaluate`` and ``run_waves``.
"""

from flare.eval.harness import EvalReport, ModeResult, evaluate
from flare.eval.tasks import EvalItem, Task, load_task
from flare.eval.throughput import EngineTarget, HttpTarget, WaveRun, parse_targets, run_waves

__all__ = ["EngineTarget", "EvalItem", "EvalReport", "HttpTarget", "ModeResult", "Task", "WaveRun", "evaluate",
           "load_task", "parse_targets", "run_waves"]
