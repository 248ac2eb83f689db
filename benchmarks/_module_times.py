"""Wall seconds spent in each kind of model module, via forward hooks (shared by the benchmark scripts)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

KINDS = {"Attention": "attention layers", "GatedDeltaNet": "GDN layers", "SwiGLU": "MLPs"}


@contextmanager
def module_times(model) -> Iterator[dict[str, float]]:
    """Yields a dict that fills with seconds per module kind (attention, GDN, MLP, LM head) while inside."""
    acc: dict[str, float] = {}
    starts: dict[int, float] = {}
    handles = []

    def track(module, kind):
        def pre(mod, args):
            starts[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            acc[kind] = acc.get(kind, 0.0) + time.perf_counter() - starts.pop(id(mod))

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for mod in model.modules():
        kind = KINDS.get(type(mod).__name__)
        if kind is not None:
            track(mod, kind)
    track(model.lm_head, "LM head")
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()
