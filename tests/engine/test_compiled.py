"""Decoding's forwards under torch.compile (``FLARE_COMPILE``): the same tokens as eager, every mode and family, and
an eager fallback when a compile fails. The tests trace with dynamo's ``eager`` backend (the graphs, guards and side
effects of compiled decoding, without generating code: fast, and no C++ compiler needed)."""

from __future__ import annotations

import warnings

import pytest
import torch

import flare.engine.compiled as compiled
from flare.decoding import SamplingParams
from flare.decoding.pacer import Pacer
from flare.engine import decode
from flare.engine.compiled import COMPILE_ENV, CompiledForward, compile_backend, frozen
from flare.engine.decode import _KEPT as KEPT

from tests.conftest import MASK

# Every kind of forward on the hybrid (causal steps, a group per acceptance point for one sequence, one group for
# three, blocks), and the verify rounds of a dense family; (family, mode, sequences).
CASES = [("qwen3_5", "causal", 3), ("qwen3_5", "ar_trust:redraft=every", 1), ("qwen3_5", "ar_trust:redraft=last", 3),
         ("qwen3_5", "diffusion_trust", 3), ("llama", "ar_trust:redraft=last", 3)]
PROMPTS = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15, 16, 17]]


@pytest.mark.parametrize("value,backend", [(None, None), ("0", None), ("1", "inductor"), ("inductor", "inductor"),
                                           ("eager", "eager"), (" Eager ", "eager"), ("static", "static")])
def test_flare_compile_names_the_backend(monkeypatch, value, backend):
    if value is None:
        monkeypatch.delenv(COMPILE_ENV, raising=False)
    else:
        monkeypatch.setenv(COMPILE_ENV, value)
    assert compile_backend() == backend


def test_an_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(COMPILE_ENV, "tvm")
    with pytest.raises(ValueError, match="FLARE_COMPILE='tvm'"):
        compile_backend()


def _tokens(model, mode, prompts, monkeypatch, backend):
    if backend is None:
        monkeypatch.delenv(COMPILE_ENV, raising=False)
    else:
        monkeypatch.setenv(COMPILE_ENV, backend)
    model.pacing.clear()
    result = decode(model, prompts, SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True), mode)
    return result.token_ids, result.kernel_paths


@pytest.mark.parametrize("fam,mode,n", CASES)
def test_compiled_decoding_gives_the_eager_tokens(flare_models, fam, mode, n, monkeypatch):
    """Causal steps and rows forwards through graphs: the caches they write, the commits they record and the
    tokens are eager's (fp32: exact up to rounding, greedy: the same picks)."""
    torch._dynamo.reset()
    model = flare_models[fam]
    assert model.config.mask_token_id == MASK
    mode += ":pause=0" if mode.startswith("ar_trust") else ""  # always drafting: every round a rows forward
    want, eager_paths = _tokens(model, mode, PROMPTS[:n], monkeypatch, None)
    got, paths = _tokens(model, mode, PROMPTS[:n], monkeypatch, "eager")
    assert got == want
    assert paths.get("compile") == "eager" and "compile" not in eager_paths
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def test_a_failed_compile_warns_once_and_decodes_eagerly(flare_models, monkeypatch):
    model = flare_models["qwen3_5"]
    want, _ = _tokens(model, "ar_trust", PROMPTS, monkeypatch, None)
    calls = []

    def broken(self, input_ids, ctx):
        calls.append(1)
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(CompiledForward, "__init__", _init_with(broken))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, paths = _tokens(model, "ar_trust", PROMPTS, monkeypatch, "inductor")
    assert got == want and "compile" not in paths
    assert len(calls) == 1  # the runner stops trying after the first failure
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "decoding eagerly from now on" in msgs[0] and "no C++ compiler" in msgs[0]


def _init_with(graph):
    def init(self, model, backend):
        self.model, self.backend, self.failed = model, backend, False
        self.graph = graph.__get__(self)
    return init


@pytest.mark.parametrize("length", [3, compiled.MAX_ROWS + 5])
def test_prefills_stay_eager(flare_models, monkeypatch, length):
    """Forwards of more than MAX_ROWS rows a sequence, and any into an empty cache (a prefill, short or long), never
    reach the graph; the graph's forwards see per-sequence write positions, never a range (one kind of graph)."""
    model = flare_models["qwen3_5"]
    seen = []

    def graph(self, ids, ctx):
        seen.append((ids.shape[1], ctx.cache.bound, type(ctx.write_pos)))
        return self.model.hidden_states(ids, cache=ctx.cache, context=ctx, advance=False)

    monkeypatch.setattr(CompiledForward, "__init__", _init_with(graph))
    prompt = [list(range(3, 3 + length))]
    got, _ = _tokens(model, "causal", prompt, monkeypatch, "inductor")
    want, _ = _tokens(model, "causal", prompt, monkeypatch, None)
    assert got == want and seen
    assert all(rows <= compiled.MAX_ROWS and bound > 0 and pos is torch.Tensor for rows, bound, pos in seen)


def test_a_round_that_compiled_a_graph_is_not_timed(flare_models, monkeypatch):
    """The pacer prices each kind of round on the clock: a round whose forward compiled a graph (a first kind, or a
    recompile when a size turns dynamic) would price it at the compiler's seconds."""
    torch._dynamo.reset()
    model = flare_models["qwen3_5"]
    monkeypatch.setenv(COMPILE_ENV, "eager")
    model.pacing.clear()
    rounds, seen = [], [model.compiles]
    next_kind = Pacer.next

    def next_(self, sequences, covered=None):
        timed_before = sum(len(c) for c in self.cost.values())
        kind = next_kind(self, sequences, covered)
        compiled, seen[0] = model.compiles != seen[0], model.compiles
        rounds.append((compiled, sum(len(c) for c in self.cost.values()) > timed_before))
        return kind

    monkeypatch.setattr(Pacer, "next", next_)
    decode(model, PROMPTS[:1], SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True), "ar_trust")
    assert any(c for c, _ in rounds) and any(t for _, t in rounds)  # rounds compiled, and rounds were timed
    assert not any(c and t for c, t in rounds)


@pytest.mark.parametrize("setting", ["eager", "static"])
def test_a_compiled_server_warms_its_graphs_up_before_serving(flare_models, monkeypatch, setting):
    """``flare serve`` with FLARE_COMPILE compiles what its first requests would (the default mode and causal
    decoding, alone and a full batch) before it takes any; eagerly it compiles nothing."""
    from flare.engine import EngineConfig
    from flare.engine.llm import LLM
    from flare.serve import warm_up

    torch._dynamo.reset()
    model = flare_models["qwen3_5"]
    llm = LLM(model, None, EngineConfig(max_num_seqs=2, default_mode="ar_trust"))
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    before = model.compiles
    warm_up(llm)
    assert model.compiles == before
    if setting == "static":
        _static(monkeypatch)
    monkeypatch.setenv(COMPILE_ENV, setting)
    llm = LLM(model, None, EngineConfig(max_num_seqs=2, default_mode="ar_trust"))
    warm_up(llm)
    assert model.compiles > before and not model.pacing and not llm.engine.stepper.lanes  # paced afresh
    warmed = model.compiles
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    llm.engine.generate([PROMPTS[0]], params, "causal")
    llm.engine.generate(PROMPTS[:2], params, "causal")
    assert model.compiles == warmed


def _static(monkeypatch, backend="eager"):
    """``FLARE_COMPILE=static`` tracing with ``backend`` (dynamo's eager one: the graphs, guards and replays of the
    static path without generating code), from no kept runner and no graph."""
    torch._dynamo.reset()
    KEPT.clear()
    monkeypatch.setattr(compiled, "STATIC_BACKEND", backend)
    return "static"


@pytest.mark.parametrize("fam,mode,n", CASES)
def test_static_compiled_decoding_gives_the_eager_tokens_and_replays_without_compiling(flare_models, fam, mode, n,
                                                                                     monkeypatch):
    """FLARE_COMPILE=static: every short forward into a cache runs one graph per kind, batch, rows and capacity (the
    graphed path's bookkeeping, ``flare.engine.graphed``). The tokens are eager's, and a second decode of the same
    shape compiles nothing: no guard that changes step to step (a cache length, a count) reached a graph."""
    model = flare_models[fam]
    mode += ":pause=0" if mode.startswith("ar_trust") else ""
    want, _ = _tokens(model, mode, PROMPTS[:n], monkeypatch, None)
    setting = _static(monkeypatch)
    got, paths = _tokens(model, mode, PROMPTS[:n], monkeypatch, setting)
    assert got == want and paths.get("compile") == "FLARE_COMPILE=static"
    graphs, compiles = compiled.graphs_compiled(), model.compiles
    assert graphs >= 1 and compiles >= 1
    again, _ = _tokens(model, mode, PROMPTS[:n], monkeypatch, setting)
    assert again == want
    if not mode.startswith("ar_trust"):  # AR-Trust's pacer may pick another kind of round the second time
        assert (compiled.graphs_compiled(), model.compiles) == (graphs, compiles)
    KEPT.clear()


def test_static_compiled_rounds_of_one_kind_replay_one_graph(flare_models, monkeypatch):
    """The verify rounds of one pinned kind, decoded twice: the second decode compiles nothing (the rounds' row
    trees, masks and commit records reach the graph as its buffers, not as guarded host values)."""
    model = flare_models["qwen3_5"]
    mode = "ar_trust:redraft=last:pause=0:gen_block=3"
    want, _ = _tokens(model, mode, PROMPTS[:1], monkeypatch, None)
    setting = _static(monkeypatch)
    _tokens(model, mode, PROMPTS[:1], monkeypatch, setting)
    graphs = compiled.graphs_compiled()
    got, _ = _tokens(model, mode, PROMPTS[:1], monkeypatch, setting)
    assert got == want and compiled.graphs_compiled() == graphs
    KEPT.clear()


@pytest.mark.parametrize("mode", ["causal", "ar_trust:redraft=every:pause=0", "ar_trust:redraft=tree:pause=0",
                                  "diffusion_trust"])
@pytest.mark.parametrize("spans", [True, False])
def test_static_attention_over_the_longest_sequence_gives_the_eager_tokens(flare_models, monkeypatch, mode, spans):
    """Where a graph's capacity is large (``SPAN_MIN_WORK``; the tiny model's never is unless the bar is lowered),
    attention reads the keys up to the longest sequence only (``span_attention``), else the whole capacity: the
    eager tokens either way."""
    import flare.engine.graphed as graphed

    model = flare_models["qwen3_5"]
    want, _ = _tokens(model, mode, PROMPTS, monkeypatch, None)
    monkeypatch.setattr(graphed, "SPAN_MIN_WORK", 0 if spans else 2**62)
    seen = []
    replay = graphed.GraphedForward._replay
    monkeypatch.setattr(graphed.GraphedForward, "_replay", lambda self, ids, ctx: seen.append(ctx.span) or replay(
        self, ids, ctx))
    got, _ = _tokens(model, mode, PROMPTS, monkeypatch, _static(monkeypatch))
    assert got == want and seen
    assert all((span is not None) == spans for span in seen)
    KEPT.clear()


def test_a_failed_static_compile_warns_once_and_decodes_eagerly(flare_models, monkeypatch):
    model = flare_models["qwen3_5"]
    want, _ = _tokens(model, "ar_trust", PROMPTS, monkeypatch, None)
    _static(monkeypatch, backend="no-such-backend")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, paths = _tokens(model, "ar_trust", PROMPTS, monkeypatch, "static")
    assert got == want and "compile" not in paths
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "FLARE_COMPILE=static" in msgs[0] and "capture failed" in msgs[0]
    KEPT.clear()


def test_inductor_is_patched_to_freeze_the_weights():
    """``torch.compile(options={"freezing": True})`` leaves freezing off (the weights stay graph inputs and a bf16
    linear runs aten::mm): the compiling call runs under a config patch instead."""
    import torch._inductor.config as inductor_config

    assert not inductor_config.freezing
    with frozen("inductor"):
        assert inductor_config.freezing
    with frozen("eager"):
        assert not inductor_config.freezing
    assert not inductor_config.freezing


@pytest.mark.slow
def test_static_inductor_decoding_gives_the_eager_tokens(flare_models, monkeypatch):
    """The real thing once: inductor's code for a causal decode of the hybrid (one sequence, two capacities' graphs
    at most) and for AR-Trust rounds of one kind, the same greedy tokens as eager; the weights freezing packs are
    packed once, for every graph (``shared_packing``)."""
    model = flare_models["qwen3_5"]
    want, _ = _tokens(model, "causal", PROMPTS[:1], monkeypatch, None)
    setting = _static(monkeypatch, backend="inductor")
    got, paths = _tokens(model, "causal", PROMPTS[:1], monkeypatch, setting)
    assert got == want and paths.get("compile") == "FLARE_COMPILE=static"
    packs = dict(compiled._PACKS[model])
    graphs = compiled.graphs_compiled()
    assert packs and all(w.data_ptr() in {p.data_ptr() for p in model.parameters()} for w, _ in packs.values())
    got, _ = _tokens(model, "ar_trust:gen_block=3:redraft=last:pause=0", PROMPTS[:1], monkeypatch, setting)
    assert got == want and compiled.graphs_compiled() > graphs
    assert compiled._PACKS[model].keys() == packs.keys()  # the rounds' graph packed nothing of its own
    KEPT.clear()


@pytest.mark.parametrize("redraft", ["auto", "last"])
def test_static_warm_forms_leave_no_kind_of_paced_round_to_compile(flare_models, monkeypatch, redraft):
    """``warm_forms``: a paced AR-Trust's kinds of round, each pinned (m drafts and one MASK group, a group per
    acceptance point, causal steps). Once they ran, a paced decode whose pacer takes every kind in turn compiles
    nothing (each pinned form's forward is its kind's) and gives the causal tokens."""
    import itertools

    from flare.decoding import as_options
    from flare.decoding.pacer import CAUSAL, EVERY

    model = flare_models["qwen3_5"]
    want, _ = _tokens(model, "causal", PROMPTS[:1], monkeypatch, None)
    setting = _static(monkeypatch)
    monkeypatch.setenv(COMPILE_ENV, setting)
    options = as_options(f"ar_trust:redraft={redraft}")
    M = options.resolve(model.config.trained_block).gen_block - 1
    forms = compiled.warm_forms(model, options, 1)
    pinned = [f"ar_trust:gen_block={m + 1}:redraft=last:pause=0" for m in range(1, M + 1)]
    every = [f"ar_trust:gen_block={M + 1}:redraft=every:pause=0"] if redraft == "auto" else []
    assert [f.label() for f in forms] == pinned + every + ["causal", options.label()]
    wide = [f.label() for f in compiled.warm_forms(model, options, 4)]
    assert wide == pinned + ["causal", options.label()]  # no group per acceptance point past 2 slots
    for form in forms[:-1]:
        _tokens(model, form, PROMPTS[:1], monkeypatch, setting)
    graphs = compiled.graphs_compiled()
    kinds = tuple(range(1, M + 1)) + ((EVERY,) if redraft == "auto" else ()) + (CAUSAL,)
    turns = itertools.cycle(kinds * 2)  # each kind twice in a row: a round after a round of its own kind too
    ran = []

    def in_turn(self, sequences, covered=None):
        ran.append(next(turns))
        return ran[-1]

    monkeypatch.setattr(Pacer, "next", in_turn)
    got, _ = _tokens(model, options, PROMPTS[:1], monkeypatch, setting)
    assert got == want and set(ran) == set(kinds)
    assert compiled.graphs_compiled() == graphs
    assert compiled.warm_forms(model, as_options("ar_trust:pause=0"), 1) == [as_options("ar_trust:pause=0")]
    KEPT.clear()
