"""Decoding's short forwards under ``torch.compile``: opt-in with ``FLARE_COMPILE=inductor`` (or ``eager``: dynamo
alone, no code generated, what the tests run), or ``FLARE_COMPILE=static`` (a graph per static shape, below).

A decode step and a verify round run the same few shapes over and over (slots x rows, a cache that grows by one
committed length at a time), so dynamo's automatic dynamic shapes settle on a bounded set of graphs (10 for both
modes of ``bench_modes.py`` at batch 1 and 8 on the demo model): the first compile of a kind specialises, a
recompile makes the sizes that changed (the cache's length bound, the rows, the batch) symbolic. The context of
each forward (masks, positions, the row tree) is built eagerly beforehand (``FlareModel.context``), with
per-sequence positions and masks always, and the graph holds the decoder stack (``FlareModel.hidden_states`` with
that context): its cache writes and commit records are the same side effects as eagerly; the cache's lengths
advance after it. Prefills (more than ``MAX_ROWS`` rows a sequence, or any forward into an empty cache) stay eager:
their lengths vary too much for a graph each. A compile that fails warns once and leaves the runner eager for good.

A forward that compiled a graph counts in ``model.compiles``; AR-Trust's pacer does not time its round (a kind
priced at the compiler's seconds, a recompile when a size turns dynamic, was avoided long after), and
``bench_modes.py`` warms up with whole decodes until one compiles nothing (before, its AR-Trust rounds at batch 1
waited on compiles: 22-28 tokens/s against 1,091 now), as ``flare serve`` does before it takes requests
(``flare.serve.warm_up``).

Measured: ``benchmarks/bench_static_step.py`` (one forward of each kind, static shapes): inductor halves a toy
model's forwards and takes a quarter off SmolLM2's; on a 0.75B Qwen3.5 shape the verify forward gains most (0.78x)
while the causal step at 8 sequences does not (1.17x). ``bench_modes.py`` on the demo checkpoint (fp32, one
thread, AMX Xeon, 5 repeats) with ``FLARE_COMPILE=inductor``: causal 829 / 4,875 tokens/s at batch 1 / 8 and
AR-Trust 1,106 / 4,309, against 498 / 2,872 and 699 / 2,658 eagerly (the same session), 10 graphs (17 before the
forwards into empty caches stayed eager, the write positions were always a tensor, kept commits were read whole and
the lengths advanced after the graph); every mode faster, AR-Trust's ratio to causal lower (its rounds' eager
bookkeeping weighs more). On the converted SmolLM2 (bf16, two threads, batch 1) causal decoding gains nothing
(36.7-39.5 tokens/s compiled, 37.0-38.8 eagerly, where the static shapes of ``bench_static_step.py`` took 0.73x:
over a growing cache the graph's shapes are symbolic) and AR-Trust 1.15x in two runs of three (51.5-51.8 against
44.2-45.3; 40.8 in the other); 7 graphs, no break. Compiling costs seconds per graph (the first decodes of the demo
model took 4-25 s, of SmolLM2 about 2 min), and on a 0.75B Qwen3.5 shape it loses: ``bench_modes.py --size real
--threads 2 --modes ar_trust:redraft=last:pause=0`` compiled 15 graphs in 21 minutes of warm-up (before the
reductions above), then took 91.7 / 142.4 ms a causal step at batch 1 / 8 and 101.1 / 192.7 a round, against 86.3 /
112.9 and 100.6 / 179.2 eagerly (packed oneDNN linears; another run, the same session). So it is off by default.
Those inductor runs had no frozen weights: ``torch.compile``'s ``options={"freezing": True}`` leaves freezing off
(the weights stay graph inputs; a bf16 linear runs ``aten::mm``, ~1.8x the packed call at one row), so the call
that compiles now runs under a config patch (``frozen``).

``FLARE_COMPILE=static``: static shapes, what ``bench_static_step.py`` measured and dynamic graphs lost. The
bookkeeping of ``flare.engine.graphed`` (each short forward into a cache shaped by its whole capacity under a length
mask, its context copied into the graph's buffers; a graph per kind, batch, rows and capacity) with each graph
compiled by inductor for its shapes, weights frozen (``static_capture``). Steps cover a power of two of slots
(``CachedRunner.covers``), prefills run eagerly, and an engine's cache starts at ``GRAPHED_CAPACITY`` KV slots, so
a server compiles its graphs in its warm-up; where a graph's capacity is large (``SPAN_MIN_WORK``), attention
reads the longest sequence's keys only (``flare.ops.attention.span_attention``: the whole capacity, 1,024 slots
in a server, made 8 requests' steps slower than eager, ``flare serve`` 140.5 against 216.1 tokens/s, spanned
271.8). Measured on an AVX-512-BF16 EPYC without AMX (``bench_modes.py``, eager then static in one session): the
demo checkpoint (fp32, one thread, ``--task arithmetic``, 5 repeats) causal 559 / 2,771 -> 1,031 / 5,138 tokens/s
at batch 1 / 8, AR-Trust 670 / 2,434 -> 1,195 / 3,754 (its ratio to causal 1.20x / 0.88x -> 1.16x / 0.73x: a
round's eager bookkeeping weighs more), 10 graphs in 83 s of warm-up; SmolLM2 (bf16, two threads, 32 random
prompt tokens, 32 new; a barely trained conversion, so AR-Trust drafts are rejected and this prices its rounds)
causal 40.6 / 245.6 -> 50.9 / 252.8, AR-Trust 38.7 / 184.8 -> 49.4 / 245.6, 10 graphs in 254 s, peak memory 1.4
-> 3.5 GB (each graph holds its frozen, packed weights). Measured and not kept: linears as an opaque custom op
on the shared packed weights instead of freezing (a graph compiles in 8 s instead of 28 and holds no weights, but
a SmolLM2 decode took 1.0 s against 0.65: a Python custom op's call costs). Since, a model's graphs share the
packed weights freezing makes (``shared_packing``: SmolLM2, 3 graphs, peak memory 1.79 -> 1.37 GB), and warm-ups
(``flare serve``, ``flare.eval``, ``bench_modes.py``) run each kind of round a paced AR-Trust may choose, pinned
(``warm_forms``), over each power of two of slots: a pacer tries its kinds now and then, and a batch's last
sequences cover fewer slots, so a timed demo decode at batch 8 had met a kind not compiled yet (11.1 s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import unittest.mock
import warnings
import weakref

import torch

from flare.decoding.ar_trust import AUTO_EVERY_SLOTS, EVERY_FORMS
from flare.decoding.options import ArTrustOptions, CausalOptions, ModeOptions
from flare.engine.graphed import MAX_ROWS, GraphedForward, graphs_setting
from flare.model import FlareModel

COMPILE_ENV = "FLARE_COMPILE"
BACKENDS = ("inductor", "eager", "static")
STATIC_BACKEND = "inductor"  # what FLARE_COMPILE=static compiles with (its tests trace with dynamo's eager backend)
STATIC_GRAPHS = 256  # dynamo's limit of static graphs in a process (past it a capture runs eagerly)
RECOMPILE_LIMIT = 64
WARMUPS = 6  # the most whole warm-up decodes of one kind (``warm_until_compiled``)


def compile_backend() -> str | None:
    """The backend ``FLARE_COMPILE`` asks for (None: off, the default)."""
    value = os.environ.get(COMPILE_ENV, "0").strip().lower()
    if value in ("", "0", "off", "false", "no"):
        return None
    if value in ("1", "on", "true", "yes"):
        return "inductor"
    if value not in BACKENDS:
        raise ValueError(f"{COMPILE_ENV}={value!r}: use 0, 1, inductor, static or eager")
    return value


class CompiledForward:
    """``model.hidden_states`` for a decoding runner, through one compiled graph family where it applies."""

    def __init__(self, model: FlareModel, backend: str) -> None:
        self.model, self.backend = model, backend
        # Inductor with freezing (``frozen``): the weights are constants of the graph, and its linears are packed
        # by inductor (a packed linear traces as F.linear, flare.model.packed_linear).
        # Decoding's forwards differ in kind (causal steps, chains and trees of rows, with and without a commit
        # record) and in size: more graphs than dynamo's default limit of 8 a function, past which it runs eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self.graph = torch.compile(self._stack, backend=backend, dynamic=None)
        self.failed = False

    def _stack(self, input_ids: torch.Tensor, ctx) -> torch.Tensor:
        # The class's method: a wrapper put on the instance (a benchmark's timer) stays out of the graph.
        # The cache's lengths advance after the graph (``advance_cache``): inside it, the host-side bound's
        # flags would be guards, a graph each.
        return type(self.model).hidden_states(self.model, input_ids, cache=ctx.cache, context=ctx, advance=False)

    def __call__(self, input_ids: torch.Tensor, *, cache, valid=None, layout=None, record=None) -> torch.Tensor:
        model = self.model
        if self.failed or input_ids.shape[1] > MAX_ROWS or cache is None or cache.bound == 0:
            return model.hidden_states(input_ids, cache=cache, valid=valid, layout=layout, record=record)
        # Per-sequence write positions and masks, even where every length equals the bound (eagerly a range and
        # no mask, cheaper): one kind of graph for both, not a graph each (a compile of the 0.75B shape: 1-2 min).
        exact, cache.bound_exact = cache.bound_exact, False
        try:
            ctx = model.context(input_ids, cache=cache, valid=valid, layout=layout, record=record)
        finally:
            cache.bound_exact = exact
        graphs = graphs_compiled()
        try:
            with frozen(self.backend):
                out = self.graph(input_ids, ctx)
        except Exception as e:  # a compile error happens before the graph runs: nothing was written yet
            self.failed = True
            warnings.warn(f"torch.compile ({self.backend}) of the decoding forward failed, decoding eagerly from "
                          f"now on: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
            return model.hidden_states(input_ids, cache=cache, context=ctx)
        model.advance_cache(ctx, input_ids.shape[1])
        model.compiled_with = self.backend
        model.compiles += graphs_compiled() != graphs
        return out


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (recompiles included)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def warms_up(model: FlareModel) -> str | None:
    """What decoding compiles or captures on first use, which timing and serving warm up first: ``"CUDA graphs"``
    (``FLARE_CUDA_GRAPHS``), the ``FLARE_COMPILE`` backend, or None (eager)."""
    return "CUDA graphs" if graphs_setting(model.device) is not None else compile_backend()


def keeps_graphs(model: FlareModel) -> bool:
    """Whether decoding's forwards run from graphs kept per cache (``FLARE_CUDA_GRAPHS``, or ``FLARE_COMPILE=static``):
    then a runner is worth keeping between calls of one shape (``flare.engine.decode``)."""
    return graphs_setting(model.device) is not None or compile_backend() == "static"


def warm_until_compiled(model: FlareModel, run, most: int = WARMUPS) -> None:
    """Where decoding is compiled or graphed, call ``run()`` (a whole decode) until a call compiles or captures no
    graph, at most ``most`` times, so that no timed or served round waits for it; eagerly, nothing."""
    if warms_up(model) is None:
        return
    for _ in range(most):
        compiles = model.compiles
        run()
        if model.compiles == compiles:
            return


def warm_forms(model: FlareModel, options: ModeOptions, covered: int) -> list[ModeOptions]:
    """The modes to warm up, one after another, so that ``options``' rounds over ``covered`` slots find their graphs
    where graphs are kept per forward shape (``keeps_graphs``): the mode itself, and for a paced AR-Trust (``pause``
    > 0) every kind of round its pacer may run, each pinned: m drafts with one MASK group (the round of
    ``gen_block=m+1:redraft=last:pause=0``, the same rows), a group per acceptance point (where the pacer has it at
    that width) and causal steps. A pacer tries its kinds now and then (``flare.decoding.pacer``): a warm-up of the
    mode's own requests leaves some untried, and the first trial of one would compile while requests wait."""
    if not isinstance(options, ArTrustOptions) or options.pause == 0 or not keeps_graphs(model):
        return [options]
    known = options.resolve(model.config.trained_block)
    forms: list[ModeOptions] = []
    if known.redraft not in EVERY_FORMS:
        forms += [dataclasses.replace(known, gen_block=m + 1, redraft="last", pause=0)
                  for m in range(1, known.gen_block)]
    if known.redraft in EVERY_FORMS or (known.redraft == "auto" and covered <= AUTO_EVERY_SLOTS):
        forms.append(dataclasses.replace(known, redraft="every" if known.redraft == "auto" else known.redraft,
                                         pause=0))
    return forms + [CausalOptions(), options]


def warm_batches(slots: int) -> list[int]:
    """The batches an engine's warm-up runs: alone, each power of two below its ``slots`` (graphed steps cover such
    a count of slots, ``CachedRunner.covers``), and a full batch with one more admitted as a slot frees (a prefill
    into a busy cache)."""
    return [1 << k for k in range(slots.bit_length()) if 1 << k < slots] + [slots + 1]


def warm_modes(model: FlareModel, modes: list[ModeOptions], slots: int, run) -> None:
    """Warm an engine of ``slots`` slots up for ``modes`` where decoding is compiled or graphed: ``run(n, form)``
    (a batch of n requests in mode ``form``) for each of ``warm_batches`` and each of the modes' ``warm_forms``
    (a form two modes share once), each until it compiles nothing (``warm_until_compiled``)."""
    if warms_up(model) is None:
        return
    for n in warm_batches(slots):
        for form in dict.fromkeys(f for mode in modes for f in warm_forms(model, mode, min(n, slots))):
            warm_until_compiled(model, lambda: run(n, form))


def frozen(backend: str):
    """Inductor with freezing (weights folded into the graph as constants, its linears packed for oneDNN): a config
    patch around the call that compiles, as ``torch.compile``'s ``options`` leave freezing off (measured: a bf16
    linear then runs ``aten::mm`` on the weight as an input, ~1.8x the packed call at one row)."""
    return torch._inductor.config.patch(freezing=True) if backend == "inductor" else contextlib.nullcontext()


# Per model: the weights inductor's freezing packed for its linears, shared by every static graph (``shared_packing``).
_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_packing(packs: dict):
    """Freezing packs each linear's weight for oneDNN (or MKL) as a constant of the graph it compiles: a copy of the
    weights per graph (SmolLM2: 10 graphs took peak memory from 1.4 to 3.5 GB). Within this context a graph's
    packing of a weight that ``packs`` holds is that copy: the same weight (address, shape, strides, dtype and
    version; a packing serves any row count, the row hint aside) is packed once for all of a model's graphs. The
    entry keeps its weight alive, so no other tensor can take its address."""
    from torch._inductor.constant_folding import ConstantFolder

    ops = {torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._reorder_linear_weight.default}
    if torch._C.has_mkl:
        ops |= {torch.ops.mkl._mkl_reorder_linear_weight, torch.ops.mkl._mkl_reorder_linear_weight.default}
    deduce = ConstantFolder._deduce_value

    def shared(self, node):
        if node.op == "call_function" and node.target in ops:
            w = self.fetch_args_kwargs_from_env(node)[0][0]
            if isinstance(w, torch.Tensor) and w.device.type != "meta":
                key = (str(node.target), w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, w._version)
                if key not in packs:
                    packs[key] = (w, deduce(self, node))
                return packs[key][1]
        return deduce(self, node)

    return unittest.mock.patch.object(ConstantFolder, "_deduce_value", shared)


def static_capture(fn, pool, packs: dict):
    """``fn`` (a forward over ``GraphedForward``'s buffers: static shapes) compiled for its shapes, with the weights
    frozen into the graph (their packed copies shared through ``packs``, ``shared_packing``): (replay, the output a
    replay writes)."""
    # Every graph is a closure of the same code: dynamo's limit of graphs a code object holds is theirs together.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, STATIC_GRAPHS)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           STATIC_GRAPHS)
    graph = torch.compile(fn, backend=STATIC_BACKEND, dynamic=False, fullgraph=True)
    with frozen(STATIC_BACKEND), shared_packing(packs):
        out = graph()

    def replay() -> None:
        # The graph's key (``GraphedForward``) has matched this forward's kind, shapes, capacity and cache tensors,
        # and every host value its ops depend on is fixed by those (what the emulated replays check): dynamo then
        # evaluates only the guards that tell its graphs apart (a SmolLM2 step's lookup 0.84 -> 0.21 ms).
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            out.copy_(graph())

    return replay, out


def decoding_forward(model: FlareModel):
    """What a cached runner calls for a forward: its causal steps replayed from CUDA graphs where
    ``FLARE_CUDA_GRAPHS`` asks (``flare.engine.graphed``), else the compiled one where ``FLARE_COMPILE`` asks, else
    ``model.hidden_states``."""
    model.compiled_with = ""  # until this runner's first compiled (or graphed) forward
    graphs = graphs_setting(model.device)
    if graphs is not None:
        return GraphedForward(model, graphs)
    backend = compile_backend()
    if backend == "static":
        packs = _PACKS.setdefault(model, {})
        return GraphedForward(model, "static", lambda fn, pool: static_capture(fn, pool, packs),
                              f"{COMPILE_ENV}=static", spans=True)
    return model.hidden_states if backend is None else CompiledForward(model, backend)
