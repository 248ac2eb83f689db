"""Decoding's causal steps replayed from CUDA graphs: opt-in with ``FLARE_CUDA_GRAPHS=1`` on a CUDA device.

Why: an eager decode step of a 0.75B Qwen3.5 shape on an H200 is the host launching about a thousand small kernels,
25 ms against a 0.37 ms memory floor; the same static forward replayed from a CUDA graph took 3.7 ms
(``benchmarks/bench_static_step.py``, ``benchmarks/README.md`` "On a GPU").

What is graphed: causal forwards of at most ``MAX_ROWS`` rows a sequence into a cache that holds something
(decode steps, committed blocks, right-padded or not). Prefills and rows forwards (AR-Trust's verify, the block
decoders' denoising) run eagerly as before.

How the shapes are made static: during the forward the cache's host-side bound is set to its capacity less the
new rows, so the context's positions and masks are per sequence over every KV slot and attention reads the whole
capacity (the mask hides the slots past each length); the context is built eagerly each step (positions, rotary
tables, the mask, the padding: a few small ops) and copied into the graph's own buffers, with the token ids; the
recurrent states are written in place (``ForwardContext.in_place``). A graph is kept per batch, rows, capacity and the
addresses of the cache tensors it reads: a cache that grew or was rebuilt gets graphs of its own. Capturing runs
the forward (a warm-up, then the capture), so the recurrent states it updates are saved before and put back after;
the real step is the first replay.

``FLARE_CUDA_GRAPHS=emulate`` runs the same bookkeeping on any device with replay = the captured function run again
over the same buffers: what the CPU tests check (token identity with eager decoding, and that every forward leaves
the cache's tensors where it found them, without which a real replay would read stale memory). A capture that
fails, or a forward that replaces a cache tensor, warns once and leaves the runner eager for good.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable

import torch

from flare.model import FlareModel
from flare.model.cache import AttentionState, ModelCache

GRAPHS_ENV = "FLARE_CUDA_GRAPHS"
SETTINGS = ("cuda", "emulate")
MAX_ROWS = 16  # causal forwards of more rows a sequence (prefills) run eagerly
MAX_GRAPHS = 64  # kept at once (each holds its activations in a shared pool); the oldest goes first


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
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph.replay, out


def emulated_capture(fn: Callable[[], torch.Tensor], pool) -> tuple[Callable[[], None], torch.Tensor]:
    """The CPU stand-in: a replay runs ``fn`` again and writes its result into the first run's output, as a graph
    writes into the output it captured."""
    out = fn()

    def replay() -> None:
        out.copy_(fn())

    return replay, out


def cache_tensors(cache: ModelCache) -> list[torch.Tensor]:
    """The tensors of a cache that a causal forward reads and writes."""
    out = []
    for layer in cache.layers:
        out += [layer.k, layer.v] if isinstance(layer, AttentionState) else [layer.conv, layer.ssm]
    return out


def _where(tensors: list[torch.Tensor]) -> tuple:
    return tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in tensors)


class _Graph:
    """One captured forward: its input buffers (token ids, the context's tensors) and its output."""

    def __init__(self, ids: torch.Tensor, leaves: list[torch.Tensor]) -> None:
        self.ids, self.leaves = ids, leaves
        self.replay: Callable[[], None] | None = None
        self.out: torch.Tensor | None = None
        self.ctx = None  # the context the capture ran with, reading the buffers above


def _leaves(ctx) -> list[torch.Tensor]:
    """The context tensors a causal forward reads, in a fixed order (with right padding: its mask and counts)."""
    padded = [] if ctx.valid is None else [ctx.valid, ctx.n_new]
    return [ctx.rope.cos, ctx.rope.sin, ctx.attn_mask, ctx.write_pos, *padded]


class GraphedForward:
    """``model.hidden_states`` for a decoding runner, its causal steps replayed from CUDA graphs."""

    def __init__(self, model: FlareModel, setting: str) -> None:
        self.model = model
        self.capture = cuda_capture if setting == "cuda" else emulated_capture
        self.pool = torch.cuda.graph_pool_handle() if setting == "cuda" else None
        self.graphs: dict[tuple, _Graph] = {}
        self.captures = 0
        self.failed = False

    def __call__(self, input_ids: torch.Tensor, *, cache=None, valid=None, layout=None, record=None):
        model = self.model
        T = input_ids.shape[1]
        if (self.failed or cache is None or cache.bound == 0 or layout is not None or record is not None
                or T > MAX_ROWS):
            return model.hidden_states(input_ids, cache=cache, valid=valid, layout=layout, record=record)
        cache.reserve(T)  # before the static bound, so that a growth happens here, eagerly
        bound, exact = cache.bound, cache.bound_exact
        cache.bound, cache.bound_exact = cache.capacity - T, False
        try:
            ctx = model.context(input_ids, cache=cache, valid=valid)
            ctx.in_place = True
            out = self._replay(input_ids, ctx)
        finally:
            cache.bound, cache.bound_exact = bound, exact
        model.advance_cache(ctx, T)
        return out

    def _replay(self, input_ids: torch.Tensor, ctx) -> torch.Tensor:
        leaves = _leaves(ctx)
        key = (tuple(input_ids.shape), ctx.cache.capacity, _where(cache_tensors(ctx.cache)),
               tuple(tuple(t.shape) for t in leaves))
        graph = self.graphs.get(key) or self._capture(key, input_ids, ctx)
        if graph is None:
            return self.model.hidden_states(input_ids, cache=ctx.cache, context=ctx, advance=False)
        graph.ids.copy_(input_ids)
        for mine, new in zip(graph.leaves, leaves):
            mine.copy_(new)
        # This step's cache (a narrowed one is a new object over the same tensors, which the key checked): a
        # graph reads those tensors by address; the emulation runs the forward again, over this object.
        graph.ctx.cache = ctx.cache
        graph.replay()
        self.model.compiled_with = f"{GRAPHS_ENV}={'emulate' if self.pool is None else '1'}"
        return graph.out.clone()  # the next replay writes over the graph's own

    def _capture(self, key, input_ids: torch.Tensor, ctx) -> _Graph | None:
        model, cache = self.model, ctx.cache
        graph = _Graph(input_ids.clone(), [t.clone() for t in _leaves(ctx)])
        cos, sin, mask, pos, *padded = graph.leaves
        static = dataclasses.replace(ctx, rope=dataclasses.replace(ctx.rope, cos=cos, sin=sin), attn_mask=mask,
                                     write_pos=pos)  # the same context, reading the graph's buffers
        if padded:
            static.valid, static.n_new = padded
        graph.ctx = static
        # The warm-up and the capture run the forward: what it updates is put back after, and so are the
        # layers' tensors themselves should it have replaced one (then it cannot be graphed).
        tensors = cache_tensors(cache)
        saved = [t.clone() for t in tensors]
        held = [dict(vars(layer)) for layer in cache.layers]

        def forward() -> torch.Tensor:
            return type(model).hidden_states(model, graph.ids, cache=static.cache, context=static, advance=False)

        try:
            graph.replay, graph.out = self.capture(forward, self.pool)
            replaced = _where(cache_tensors(cache)) != key[2]
        except Exception as e:  # nothing of the step was kept: it runs eagerly
            self._fail(f"capture failed: {type(e).__name__}: {e}")
            return None
        finally:
            for layer, attrs in zip(cache.layers, held):
                vars(layer).update(attrs)
            for t, old in zip(tensors, saved):
                t.copy_(old)
        if replaced:
            self._fail("a causal forward replaced a cache tensor (a replay would read the old one)")
            return None
        if len(self.graphs) >= MAX_GRAPHS:
            self.graphs.pop(next(iter(self.graphs)))
        self.graphs[key] = graph
        self.captures += 1
        model.compiles += 1  # AR-Trust's pacer does not time a round that captured (flare.engine.compiled)
        return graph

    def _fail(self, why: str) -> None:
        if not self.failed:
            warnings.warn(f"CUDA graphs of decoding's causal steps are off from now on: {why}", RuntimeWarning,
                          stacklevel=3)
        self.failed = True
