"""Decoding's forwards replayed from CUDA graphs: opt-in with ``FLARE_CUDA_GRAPHS=1`` on a CUDA device.

Why: an eager decode step of a 0.75B Qwen3.5 shape on an H200 is the host launching about a thousand small kernels,
25 ms against a 0.37 ms memory floor; the same static forward replayed from a CUDA graph took 3.7 ms, a verify
forward 4.7 (``benchmarks/bench_static_step.py``, ``benchmarks/README.md`` "On a GPU").

What is graphed: forwards of at most ``MAX_ROWS`` rows a sequence into a cache that holds something: causal ones
(decode steps, committed blocks, right-padded or not) and rows forwards (AR-Trust's verify rounds, recorded for
their commit, with one MASK group or a group per acceptance point; the block decoders' denoising). Prefills run
eagerly as before.

How the shapes are made static: during the forward the cache's host-side bound is set to its capacity less the new
rows, so the context's positions and masks are per sequence over every KV slot and attention reads the whole
capacity (the mask hides the slots past each length); the context is built eagerly each step (positions, rotary
tables, the mask, the padding, which rows are real and which state each reads, a row tree's paths and conv windows:
a few small ops) and copied into the graph's own buffers, with the token ids; a causal forward writes the recurrent
states in place (``ForwardContext.in_place``), a commit writes the conv windows in place, and a rows forward reads
the kept updates of the states whole (``pending.reading_all``: their count changes between replays). A recorded rows
forward's record holds the graph's outputs, which the commit reads before the next replay. A graph is kept per kind,
batch, rows, capacity and the addresses of the cache tensors it reads: a cache that grew or was rebuilt gets graphs
of its own; past ``MAX_GRAPHS`` the least recently used goes. Capturing runs the forward (a warm-up, then the
capture), so the recurrent states it writes are saved before and put back after; the real step is the first replay.
Prefills stay eager but write the states in place too, so the graphs over them stay valid. The graphs share one
memory pool, which is safe because a graph's outputs are consumed (cloned, or committed) before any other graph
replays. ``decode`` keeps its runner per batch and capacity where decoding is graphed, so that its graphs serve the
next call of that shape.

``FLARE_CUDA_GRAPHS=emulate`` runs the same bookkeeping on any device with replay = the captured function run again
over the same buffers, which must run the ops, shapes and numbers the capture ran: what the CPU tests check (token
identity with eager decoding; no forward that replaces a cache tensor, reads a value back to the host or depends on
one). ``FLARE_COMPILE=static`` (``flare.engine.compiled``) runs it with each graph compiled by inductor for its
static shapes. Steps cover a power of two of slots (``CachedRunner.covers``: a graph per batch size), appends with
and without right padding share a graph, and a runner's prefills run eagerly (``eagerly``). A capture that fails,
or a forward that replaces a cache tensor, warns once and leaves the runner eager for good.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flare.model import CommitRecord, FlareModel
from flare.model.cache import NO_KV, AttentionState, ModelCache
from flare.model.context import RowMeta, Rows
from flare.model.row_tree import RowTree
from flare.ops.gated_delta.pending import reading_all

GRAPHS_ENV = "FLARE_CUDA_GRAPHS"
# Forwards of more rows a sequence (prefills) run eagerly, graphed or compiled; a round with a group per acceptance
# point has N + N(N-1) rows, with tree's branch N more (flare.decoding.groups): 16 / 20 at N = 4, 25 / 30 at N = 5.
MAX_ROWS = 32
SPAN_MIN_WORK = 2**19  # sequences x KV slots x query dims from which a static graph's attention is spanned
MAX_GRAPHS = 64  # kept at once (each holds its activations in a shared pool); the least recently used goes first


def graphs_setting(device: torch.device | str) -> str | None:
    """What ``FLARE_CUDA_GRAPHS`` asks for on ``device``: ``"cuda"`` (1/on, CUDA devices only), ``"emulate"``, or
    None (off, the default)."""
    value = os.environ.get(GRAPHS_ENV, "0").strip().lower()
    if value in ("", "0", "off", "false", "no"):
        return None
    if value in ("1", "on", "true", "yes", "cuda"):
        if torch.device(device).type != "cuda":
            return None  # nothing to capture on this device: eager, as without the setting
        return "cuda"
    if value == "emulate":
        return value
    raise ValueError(f"{GRAPHS_ENV}={value!r}: use 0, 1 or emulate")


def cuda_capture(fn: Callable[[], torch.Tensor], pool) -> tuple[Callable[[], None], torch.Tensor]:
    """``fn`` captured in a CUDA graph after one warm-up on a side stream: (replay, the graph's output tensor)."""
    stream = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        fn()
    stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    except Exception:
        torch.cuda.set_stream(stream)  # a capture that fails to end can leave its own stream current
        raise
    return graph.replay, out


class _OpLog(TorchDispatchMode):
    """The ops a function runs, the shapes they take and the numbers passed to them: what a CUDA graph fixes at
    capture."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        fixed = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in tree_leaves((args, kwargs))
                      if isinstance(x, (torch.Tensor, int, float, bool)))
        self.ops.append((str(func), fixed))
        return func(*args, **(kwargs or {}))


def _logged(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[tuple]]:
    with _OpLog() as log:
        out = fn()
    return out, log.ops


def emulated_capture(fn: Callable[[], torch.Tensor], pool) -> tuple[Callable[[], None], torch.Tensor]:
    """The CPU stand-in: a replay runs ``fn`` again and writes its result into the first run's output, as a graph
    writes into the output it captured; and it must run the ops the capture ran, on the same shapes (a graph
    replays those whatever the host's values are now: a forward whose ops depend on one cannot be graphed). A
    warm-up first, as before a real capture (what is built once and kept, e.g. a constant, is built there)."""
    fn()
    out, captured = _logged(fn)

    def replay() -> None:
        new, ops = _logged(fn)
        if ops != captured:
            at = next((i for i, (a, b) in enumerate(zip(ops, captured)) if a != b), min(len(ops), len(captured)))
            raise RuntimeError(f"a replay ran other ops than its capture, from op {at}: "
                               f"{ops[at] if at < len(ops) else 'none'} against "
                               f"{captured[at] if at < len(captured) else 'none'}")
        out.copy_(new)

    return replay, out


def cache_tensors(cache: ModelCache) -> list[torch.Tensor]:
    """The tensors of a cache that a forward reads or writes: keys and values, conv windows, states and their
    kept updates."""
    out = []
    for layer in cache.layers:
        if isinstance(layer, AttentionState):
            out += [layer.k, layer.v]
        else:
            out += [layer.conv, layer.ssm, layer.pending.scale, layer.pending.k, layer.pending.u]
    return out


def _where(tensors: list[torch.Tensor]) -> tuple:
    """Their addresses (their shapes follow from the batch and the capacity, which a graph's key holds too)."""
    return tuple(t.data_ptr() for t in tensors)


class _Graph:
    """One captured forward: its input buffers (token ids, the context's tensors), the context that reads them
    and its output."""

    def __init__(self, ids: torch.Tensor, leaves: dict[str, torch.Tensor]) -> None:
        self.ids, self.leaves = ids, leaves
        self.replay: Callable[[], None] | None = None
        self.out: torch.Tensor | None = None
        self.ctx = None


def _leaves(ctx) -> dict[str, torch.Tensor]:
    """The context tensors a forward reads: positions, rotary tables, mask; a causal forward's right padding; a
    rows forward's real rows and the state each row reads."""
    out = {"cos": ctx.rope.cos, "sin": ctx.rope.sin, "mask": ctx.attn_mask, "pos": ctx.write_pos}
    if ctx.span is not None:
        out["span"] = ctx.span
    if ctx.valid is not None:
        out.update(valid=ctx.valid, n_new=ctx.n_new)
    if ctx.row_meta is not None:
        out["rows"] = ctx.row_meta.valid
        if ctx.row_meta.reads is not None:
            out["reads"] = ctx.row_meta.reads
    if ctx.tree is not None:  # what the recurrent layers read of a row tree: paths, reads, conv windows
        out.update(tree_path=ctx.tree.path, tree_reads=ctx.tree.reads)
        out.update({f"tree_windows_{key[1]}": t for key, t in ctx.tree._memo.items() if key[0] == "windows"})
    return out


def _static(ctx, bufs: dict[str, torch.Tensor]):
    """``ctx`` reading the graph's buffers (and, for a recorded rows forward, filling a record of its own)."""
    static = dataclasses.replace(ctx, rope=dataclasses.replace(ctx.rope, cos=bufs["cos"], sin=bufs["sin"]),
                                 attn_mask=bufs["mask"], write_pos=bufs["pos"])
    if "span" in bufs:
        static.span = bufs["span"]
    if "valid" in bufs:
        static.valid, static.n_new = bufs["valid"], bufs["n_new"]
    if ctx.row_meta is not None:
        static.row_meta = RowMeta(bufs["rows"], bufs.get("reads"))
    if ctx.tree is not None:
        t = ctx.tree
        windows = {("windows", int(name.rsplit("_", 1)[1])): buf for name, buf in bufs.items()
                   if name.startswith("tree_windows_")}
        static.tree = RowTree(t.parent, bufs["tree_reads"], bufs["tree_path"], t.depth, t.real, _memo=windows)
    if ctx.record is not None:
        static.record = CommitRecord(ctx.record.rows, {})
    return static


@contextmanager
def eagerly(forward):
    """Forwards inside run eagerly where ``forward`` would replay graphs (a runner's prefills: a prompt's rest after a
    kept beginning can be a few tokens, and a graph for each prompt length would compile while clients wait)."""
    graphed = isinstance(forward, GraphedForward)
    if graphed:
        forward.eager = True
    try:
        yield
    finally:
        if graphed:
            forward.eager = False


class GraphedForward:
    """``model.hidden_states`` for a decoding runner, its short forwards into a non-empty cache replayed from CUDA
    graphs."""

    def __init__(self, model: FlareModel, setting: str, capture: Callable | None = None,
                 label: str | None = None, spans: bool = False) -> None:
        self.model, self.spans = model, spans  # spans: attention reads the longest sequence's keys, not capacity
        self.label = label or f"{GRAPHS_ENV}={'emulate' if setting == 'emulate' else '1'}"
        self.capture = capture or (cuda_capture if setting == "cuda" else emulated_capture)
        self.pool = torch.cuda.graph_pool_handle() if setting == "cuda" else None
        self.graphs: dict[tuple, _Graph] = {}
        self.captures = 0
        self.failed = False
        self.eager = False  # set while a runner prefills (``eagerly``): no graph for a prompt's shape

    def __call__(self, input_ids: torch.Tensor, *, cache=None, valid=None, layout=None, record=None):
        model = self.model
        T = input_ids.shape[1]
        if (self.failed or self.eager or cache is None or cache.bound == 0 or T > MAX_ROWS or cache.capacity == NO_KV
                or not (layout is None or isinstance(layout, Rows))):
            if cache is not None and layout is None:
                # A prefill writes the states in place too, so the graphs captured over them stay valid.
                ctx = model.context(input_ids, cache=cache, valid=valid)
                ctx.in_place = True
                return model.hidden_states(input_ids, cache=cache, context=ctx)
            return model.hidden_states(input_ids, cache=cache, valid=valid, layout=layout, record=record)
        if layout is None and valid is None:
            # Appends with and without right padding run one kind of graph (a server's steps have both, as slots
            # fill and empty): every row valid is no padding.
            valid = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        cache.reserve(T)  # before the static bound, so that a growth happens here, eagerly
        bound, exact = cache.bound, cache.bound_exact
        cache.bound, cache.bound_exact = cache.capacity - T, False
        try:
            ctx = model.context(input_ids, cache=cache, valid=valid, layout=layout, record=record)
            ctx.in_place = True
            if self.spans and self._spans(input_ids.shape[0], cache.capacity):
                ctx.span = torch.tensor([bound + T])  # host: span_attention reads it on the host
            out = self._replay(input_ids, ctx)
        finally:
            cache.bound, cache.bound_exact = bound, exact
        model.advance_cache(ctx, T)
        return out

    def _spans(self, batch: int, capacity: int) -> bool:
        """Whether attention reads only the longest sequence's keys (``span_attention``) rather than the whole
        capacity: where the capacity's query-key work passes ``SPAN_MIN_WORK`` (the op costs a fixed call; measured,
        SmolLM2 static steps: 1 x 128 slots 19.6 ms whole against 22.1 spanned, 8 x 128 29.2 against 28.3; the demo
        model at 8 x 128 5,496 against 5,067 tokens/s; 8 x 1,024 in a server 140.5 against 271.8)."""
        cfg = self.model.config
        return batch * capacity * cfg.num_attention_heads * cfg.head_dim >= SPAN_MIN_WORK

    def _replay(self, input_ids: torch.Tensor, ctx) -> torch.Tensor:
        leaves = _leaves(ctx)
        key = (ctx.mode, ctx.record is not None, tuple(input_ids.shape), ctx.cache.capacity,
               _where(cache_tensors(ctx.cache)), tuple((name, tuple(t.shape)) for name, t in leaves.items()))
        graph = self.graphs.pop(key, None)
        if graph is not None:
            self.graphs[key] = graph  # the most recently used last: the least recently used goes first
        else:
            graph = self._capture(key, input_ids, ctx)
        if graph is None:
            return self.model.hidden_states(input_ids, cache=ctx.cache, context=ctx, advance=False)
        graph.ids.copy_(input_ids)
        for name, new in leaves.items():
            graph.leaves[name].copy_(new)
        # This step's cache (a narrowed one is a new object over the same tensors, which the key checked): a
        # graph reads those tensors by address; the emulation runs the forward again, over this object.
        graph.ctx.cache = ctx.cache
        graph.replay()
        if ctx.record is not None:
            # What the commit reads: the graph's outputs, with this step's kept updates (host-side counts).
            layers = ctx.cache.layers
            ctx.record.gdn = {i: (scan._replace(pending=layers[i].pending), full)
                              for i, (scan, full) in graph.ctx.record.gdn.items()}
        self.model.compiled_with = self.label
        return graph.out.clone()  # the next replay writes over the graph's own

    def _capture(self, key, input_ids: torch.Tensor, ctx) -> _Graph | None:
        model, cache = self.model, ctx.cache
        graph = _Graph(input_ids.clone(), {name: t.clone() for name, t in _leaves(ctx).items()})
        graph.ctx = static = _static(ctx, graph.leaves)
        # The warm-up and the capture run the forward: the recurrent states it updates are put back after (its
        # keys and values land past each length, where the real step writes them again; the kept updates are
        # only read), and so are the layers' tensors themselves should it have replaced one (then it cannot be
        # graphed).
        states = [t for layer in cache.layers if not isinstance(layer, AttentionState) for t in (layer.conv, layer.ssm)]
        held = [dict(vars(layer)) for layer in cache.layers]
        saved: list[torch.Tensor] = []

        def forward() -> torch.Tensor:
            with reading_all():  # kept updates read whole: their count changes between replays
                return type(model).hidden_states(model, graph.ids, cache=static.cache, context=static,
                                                 advance=False)

        try:
            saved = [t.clone() for t in states]
            graph.replay, graph.out = self.capture(forward, self.pool)
            replaced = _where(cache_tensors(cache)) != key[4]
        except Exception as e:  # nothing of the step was kept: it runs eagerly
            self._fail(f"capture failed: {type(e).__name__}: {e}")
            return None
        finally:
            for layer, attrs in zip(cache.layers, held):
                vars(layer).update(attrs)
            for t, old in zip(states, saved):
                t.copy_(old)
        if replaced:
            self._fail(f"a {ctx.mode} forward replaced a cache tensor (a replay would read the old one)")
            return None
        if len(self.graphs) >= MAX_GRAPHS:
            self.graphs.pop(next(iter(self.graphs)))
        self.graphs[key] = graph
        self.captures += 1
        model.compiles += 1  # AR-Trust's pacer does not time a round that captured (flare.engine.compiled)
        return graph

    def _fail(self, why: str) -> None:
        if not self.failed:
            warnings.warn(f"{self.label}: decoding's forwards run eagerly from now on: {why}", RuntimeWarning,
                          stacklevel=3)
        self.failed = True
