"""Wall seconds of each phase of the engine's decoding steps, by wrapping the stepper's, runner's and lanes' methods
(shared by the benchmark scripts). Forward hooks (``_module_times``) see eager modules only; these wrappers sit
around the forward, so they also time compiled and graphed decoding (``FLARE_COMPILE=static``, CUDA graphs).

Phases of one ``Stepper.step`` (only time inside steps counts: admissions' prefills are left out):

- ``plan``: the lanes' choice of rows (``Lane.plan``), the steps' merged rows;
- ``context``: the forward's masks, positions and row layout (``FlareModel.context``), built eagerly;
- ``forward``: the rest of the runner's forward (``CachedRunner.append`` / ``rows``): the model's layers, or a
  graph's replay and its copies;
- ``consume``: the LM head over the rows a lane reads, sampling or verification, drafts, emitted tokens
  (``Lane.consume``);
- ``commit``: the accepted rows' cache commit after a rows forward (``CachedRunner.commit_recorded``);
- ``host read``: the step's one sync (``Stepper.sync``);
- ``other``: what the step spends around them.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from flare.decoding.lane import Lane
from flare.engine.runner import CachedRunner
from flare.engine.stepper import Stepper
from flare.model import FlareModel

PHASES = ("plan", "context", "forward", "consume", "commit", "host read", "other")


def _lanes(cls: type) -> list[type]:
    return [cls] + [c for sub in cls.__subclasses__() for c in _lanes(sub)]


@contextmanager
def step_phases() -> Iterator[dict[str, float]]:
    """Yields a dict that fills, while inside, with seconds per phase (``PHASES``) and ``steps``, the steps run."""
    acc = dict.fromkeys(PHASES, 0.0) | {"steps": 0, "step": 0.0}
    inside = [False]
    patched = []

    def wrap(cls: type, name: str, phase: str) -> None:
        inner = cls.__dict__[name]

        def timed(*args, **kwargs):
            if not inside[0]:
                return inner(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                acc[phase] += time.perf_counter() - t0

        patched.append((cls, name, inner))
        setattr(cls, name, timed)

    step = Stepper.step

    def timed_step(self):
        inside[0] = True
        t0 = time.perf_counter()
        try:
            ran = step(self)
        finally:
            inside[0] = False
        if ran:  # (a call with no live slot runs nothing: not a step)
            acc["step"] += time.perf_counter() - t0
            acc["steps"] += 1
        return ran

    patched.append((Stepper, "step", step))
    Stepper.step = timed_step
    wrap(Stepper, "_merged", "plan")
    wrap(Stepper, "sync", "host read")
    wrap(CachedRunner, "append", "forward")
    wrap(CachedRunner, "rows", "forward")
    wrap(CachedRunner, "commit_recorded", "commit")
    wrap(FlareModel, "context", "context")
    for lane in _lanes(Lane):
        for name, phase in (("plan", "plan"), ("consume", "consume")):
            if name in lane.__dict__:
                wrap(lane, name, phase)
    try:
        yield acc
    finally:
        for cls, name, inner in reversed(patched):
            setattr(cls, name, inner)
        acc["forward"] -= acc["context"]  # built inside the runner's forward call
        acc["other"] = acc["step"] - sum(acc[p] for p in PHASES if p != "other")
