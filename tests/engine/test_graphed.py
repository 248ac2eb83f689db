"""Decoding's causal steps replayed from CUDA graphs (``FLARE_CUDA_GRAPHS``): the same tokens as eager decoding, the
cache's tensors never replaced by a graphed forward, and an eager fallback with one warning where a forward cannot
be graphed. On the CPU the graph is emulated (``FLARE_CUDA_GRAPHS=emulate``: a replay runs the captured function
again over the same buffers); the ``cuda`` test captures real graphs and runs where a GPU is (gpu_check.sh)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from flare.decoding import SamplingParams
from flare.engine import Engine, EngineConfig, decode
import flare.engine.graphed as graphed
from flare.engine.decode import _KEPT as KEPT
from flare.engine.graphed import GRAPHS_ENV, GraphedForward, emulated_capture, graphs_setting
from flare.engine.stepper import Stepper
from flare.model.gated_deltanet import GatedDeltaNet
from flare.ops.gated_delta import pending

from tests.conftest import MASK

PROMPTS = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(autouse=True)
def _no_kept_runners():
    """``decode`` keeps its runners (and their graphs) where decoding is graphed: every test starts without any."""
    KEPT.clear()
    yield
    KEPT.clear()


@pytest.mark.parametrize("value,device,want", [(None, "cpu", None), ("0", "cuda", None), ("1", "cpu", None),
                                               ("1", "cuda", "cuda"), (" On ", "cuda", "cuda"),
                                               ("emulate", "cpu", "emulate")])
def test_the_setting(monkeypatch, value, device, want):
    if value is None:
        monkeypatch.delenv(GRAPHS_ENV, raising=False)
    else:
        monkeypatch.setenv(GRAPHS_ENV, value)
    assert graphs_setting(device) == want


def test_an_unknown_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(GRAPHS_ENV, "always")
    with pytest.raises(ValueError, match="FLARE_CUDA_GRAPHS='always'"):
        graphs_setting("cpu")


def _setting(model, monkeypatch, setting):
    """FLARE_CUDA_GRAPHS as ``setting`` (None: unset), with what the model's pacers learned forgotten."""
    if setting is None:
        monkeypatch.delenv(GRAPHS_ENV, raising=False)
    else:
        monkeypatch.setenv(GRAPHS_ENV, setting)
    model.pacing.clear()


def _spied(monkeypatch, what) -> list:
    """``what(ids, ctx)`` of each replayed forward, in order."""
    seen = []
    replay = GraphedForward._replay
    monkeypatch.setattr(GraphedForward, "_replay", lambda self, ids, ctx: seen.append(what(ids, ctx)) or replay(
        self, ids, ctx))
    return seen


def _decode(model, mode, prompts, monkeypatch, setting, new=12):
    _setting(model, monkeypatch, setting)
    result = decode(model, prompts, SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True), mode)
    return result.token_ids, result.kernel_paths


READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def reads_counted(fn, counts: list[int]):
    """``fn`` with the host reads it makes counted into ``counts`` (a read inside a CUDA graph's capture fails it)."""

    def run():
        originals = {name: getattr(torch.Tensor, name) for name in READS}
        n = [0]

        def counter(original):
            def counted(self, *args, **kwargs):
                n[0] += 1
                return original(self, *args, **kwargs)
            return counted

        for name, original in originals.items():
            setattr(torch.Tensor, name, counter(original))
        try:
            return fn()
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
            counts.append(n[0])

    return run


@pytest.mark.parametrize("fam", ["qwen3_5", "llama"])
@pytest.mark.parametrize("n", [1, 3])
def test_graphed_causal_decoding_gives_the_eager_tokens(flare_models, monkeypatch, fam, n):
    """Every step after the prefill replayed (fp32: the same picks), one graph for all of them, and the graphed
    forward reads nothing back to the host (which a capture cannot)."""
    model = flare_models[fam]
    want, eager = _decode(model, "causal", PROMPTS[:n], monkeypatch, None)
    reads: list[int] = []
    monkeypatch.setattr(graphed, "emulated_capture",
                        lambda fn, pool: emulated_capture(reads_counted(fn, reads), pool))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        got, paths = _decode(model, "causal", PROMPTS[:n], monkeypatch, "emulate")
    assert got == want
    assert paths.get("compile") == "FLARE_CUDA_GRAPHS=emulate" and "compile" not in eager
    assert len(reads) == 13 and set(reads) == {0}  # a warm-up, the capture, a replay for each of the eleven steps


@pytest.mark.parametrize("fam,mode,n,kept", [("qwen3_5", "ar_trust:redraft=last:pause=0", 1, False),
                                             ("qwen3_5", "ar_trust:redraft=last:pause=0", 3, True),
                                             ("qwen3_5", "ar_trust:redraft=last", 3, True),
                                             ("qwen3_5", "ar_trust", 3, True),
                                             ("qwen3_5", "diffusion_trust", 3, False),
                                             ("llama", "ar_trust:redraft=last:pause=0", 3, False)])
def test_graphed_rows_forwards_give_the_eager_tokens(flare_models, monkeypatch, fam, mode, n, kept):
    """AR-Trust's verify rounds (drafting every round, or paced against causal steps) and Diffusion-Trust's
    denoising through graphs: eager's tokens, the commits read from the graph's record (kept as updates or
    written), no host read inside."""
    monkeypatch.setattr(pending, "KEEP_MIN_STATE_BYTES", 0 if kept else 1 << 62)
    model = flare_models[fam]
    want, _ = _decode(model, mode, PROMPTS[:n], monkeypatch, None, new=16)
    reads: list[int] = []
    monkeypatch.setattr(graphed, "emulated_capture",
                        lambda fn, pool: emulated_capture(reads_counted(fn, reads), pool))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got, paths = _decode(model, mode, PROMPTS[:n], monkeypatch, "emulate", new=16)
    assert got == want and paths.get("compile") == "FLARE_CUDA_GRAPHS=emulate"
    assert len(reads) > 1 and set(reads) == {0}


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("redraft", ["every", "tree"])
def test_row_trees_are_graphed_too(flare_models, monkeypatch, n, redraft):
    """A group per acceptance point (``redraft=every``: a row tree, its paths and conv windows as graph inputs;
    tree: with the branch, committed eagerly along it): the eager tokens."""
    model = flare_models["qwen3_5"]
    mode = f"ar_trust:redraft={redraft}:pause=0"
    want, _ = _decode(model, mode, PROMPTS[:n], monkeypatch, None, new=16)
    seen = _spied(monkeypatch, lambda ids, ctx: ctx.tree)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got, paths = _decode(model, mode, PROMPTS[:n], monkeypatch, "emulate", new=16)
    assert got == want and paths.get("compile") == "FLARE_CUDA_GRAPHS=emulate"
    assert any(tree is not None for tree in seen)


def test_a_busy_engine_with_graphed_steps_gives_the_eager_tokens(flare_models, monkeypatch):
    """More requests than slots in mixed modes: admissions, resets, steps over fewer slots than the cache holds
    (narrowed caches: a graph per slot count) and AR-Trust's rows forwards (eager) between graphed causal steps."""
    model = flare_models["qwen3_5"]
    modes = ["causal", "ar_trust", "causal", "diffusion_trust", "causal"]

    def run(setting):
        _setting(model, monkeypatch, setting)
        engine = Engine(model, EngineConfig(max_num_seqs=3))
        seqs = [engine.add_request([3 + i, 9, 4 + 2 * i][: 1 + i % 3], SamplingParams(
            max_new_tokens=5 + 3 * i, temperature=0.0, ignore_eos=True), mode) for i, mode in enumerate(modes)]
        while engine.has_work:
            engine.step()
        return [list(seq.output_ids) for seq in seqs], engine

    want, _ = run(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got, engine = run("emulate")
    assert got == want
    forward = engine.stepper.runner.hidden_states
    assert isinstance(forward, GraphedForward) and forward.captures >= 2 and not forward.failed


@pytest.mark.parametrize("mode", ["causal", "ar_trust:pause=0"])
def test_graphed_steps_cover_a_power_of_two_of_slots(flare_models, monkeypatch, mode):
    """Three requests in eight slots, the third in slot 2: graphed forwards cover 4 slots (the idle one computed
    and ignored), a graph for each of log2(slots) + 1 batch sizes at most rather than one per count of busy slots;
    the tokens are eager's, which covers 3."""
    model = flare_models["qwen3_5"]
    sizes = _spied(monkeypatch, lambda ids, ctx: ids.shape[0])

    def run(setting):
        _setting(model, monkeypatch, setting)
        engine = Engine(model, EngineConfig(max_num_seqs=8))
        seqs = [engine.add_request(PROMPTS[i], SamplingParams(max_new_tokens=4 + 3 * i, temperature=0.0,
                                                              ignore_eos=True), mode) for i in range(3)]
        while engine.has_work:
            engine.step()
        return [list(seq.output_ids) for seq in seqs]

    want = run(None)
    assert not sizes
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = run("emulate")
    assert got == want
    assert 4 in sizes and set(sizes) <= {1, 2, 4, 8}


@pytest.mark.parametrize("mode", ["causal", "ar_trust:pause=0"])
def test_prefills_after_a_kept_beginning_run_eagerly(flare_models, monkeypatch, mode):
    """A prompt that starts with a kept conversation prefills only its few last tokens: eagerly (a graph for each
    such length would compile while clients wait); the steps after it replay graphs, with the eager tokens."""
    model = flare_models["qwen3_5"]
    rows = _spied(monkeypatch, lambda ids, ctx: ids.shape[1])
    base = list(range(3, 27))

    def run(setting):
        _setting(model, monkeypatch, setting)
        engine = Engine(model, EngineConfig(max_num_seqs=2))
        params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
        first = list(engine.generate([base], params, mode)[0].output_ids)
        # The conversation's next turn: the kept prompt and answer, and three tokens more.
        second = list(engine.generate([base + first + [31, 32, 33]], params, mode)[0].output_ids)
        assert engine.stats.prefix_hits >= 1
        return first, second

    want = run(None)
    got = run("emulate")
    assert got == want and rows
    if mode == "causal":
        assert set(rows) == {1}  # decode steps only: the 3-token rest of the second prompt ran eagerly


def test_a_forward_that_replaces_a_state_warns_once_and_decodes_eagerly(flare_models, monkeypatch):
    """A causal forward that hands a layer a new state tensor cannot be replayed (the graph would read the old
    one): found at capture, it turns graphs off for the runner with one warning, and the tokens stay eager's."""
    model = flare_models["qwen3_5"]
    want, _ = _decode(model, "causal", PROMPTS, monkeypatch, None)
    causal = GatedDeltaNet._causal

    def replacing(self, *args, in_place=False, **kwargs):
        return causal(self, *args, **kwargs)  # in_place dropped: the states are replaced

    monkeypatch.setattr(GatedDeltaNet, "_causal", replacing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, paths = _decode(model, "causal", PROMPTS, monkeypatch, "emulate")
    assert got == want and "compile" not in paths
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "replaced a cache tensor" in msgs[0]


def test_prefills_stay_eager_and_padded_appends_share_the_plain_ones_graphs(flare_models, monkeypatch):
    """Forwards into an empty cache or of more than MAX_ROWS rows never reach a graph; the graphed ones read the
    whole capacity (per-sequence positions and masks), and a right-padded append (its padding as graph input)
    commits what eager does, from the graph of a plain append of its shape (whose padding is none)."""
    model = flare_models["qwen3_5"]
    monkeypatch.setenv(GRAPHS_ENV, "emulate")
    stepper = Stepper(model, 2, 64)
    runner = stepper.runner
    seen = []
    replay = GraphedForward._replay

    def spy(self, ids, ctx):
        seen.append((ids.shape, ctx.attn_mask.shape[-1], ctx.cache.capacity, ctx.in_place))
        return replay(self, ids, ctx)

    monkeypatch.setattr(GraphedForward, "_replay", spy)
    eager = Stepper(model, 2, 64).runner
    eager.hidden_states = model.hidden_states
    with torch.inference_mode():  # a stepper's cache changes in place in that mode only (as decoding runs it)
        for r in (runner, eager):
            r.prefill([[3, 4, 5], [6, 7]])
            r.prefill([list(range(3, 3 + 20)), []])  # more than MAX_ROWS rows: eager
        assert not seen
        outs = [[r.append(torch.tensor([[8, 9], [10, 0]]), num_new=torch.tensor([2, 1])),
                 r.append(torch.tensor([[8], [9]])), r.append(torch.tensor([[10, 11], [12, 13]])),
                 r.append(torch.tensor([[8, 9], [10, 0]]), num_new=torch.tensor([2, 1]))] for r in (runner, eager)]
    assert [s[0] for s in seen] == [(2, 2), (2, 1), (2, 2), (2, 2)]
    assert all(cols == cap and in_place for _, cols, cap, in_place in seen)
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert runner.cache.lengths.tolist() == eager.cache.lengths.tolist() == [30, 7]
    assert runner.hidden_states.captures == 2  # 2-row appends (padded or not) and 1-row ones


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("mode", ["causal", "ar_trust:redraft=last:pause=0", "ar_trust:redraft=every:pause=0",
                                  "ar_trust:redraft=tree:pause=0", "diffusion_trust"])
def test_graphed_decoding_on_cuda(flare_models, monkeypatch, mode):
    """Real CUDA graphs, every kind of forward: the eager tokens at batch 1 and 3, no fallback."""
    model = copy.deepcopy(flare_models["qwen3_5"]).to("cuda")  # the session's own model stays on the CPU
    for n in (1, 3):
        want, _ = _decode(model, mode, PROMPTS[:n], monkeypatch, None, new=20)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            got, paths = _decode(model, mode, PROMPTS[:n], monkeypatch, "1", new=20)
        assert got == want and paths.get("compile") == "FLARE_CUDA_GRAPHS=1"


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "written"])
def test_rounds_and_their_commits_leave_the_cache_tensors_where_they_are(flare_models, monkeypatch, kept):
    """What keeps a causal step's graph valid after AR-Trust rounds: a rows forward, its commit (kept as an
    update, or written), a settle and the graphed step itself write into the cache's own tensors, so the next
    causal step finds the addresses it was captured with; and the graphed rounds, which read the kept updates
    whole (their count changes between replays), compute what eager ones do, past the updates' room too."""
    model = flare_models["qwen3_5"]
    monkeypatch.setattr(pending, "KEEP_MIN_STATE_BYTES", 0 if kept else 1 << 62)  # the tiny states: kept or not
    monkeypatch.setenv(GRAPHS_ENV, "emulate")
    runner = Stepper(model, 3, 64).runner
    eager = Stepper(model, 3, 64).runner
    eager.hidden_states = model.hidden_states
    outs = []
    with torch.inference_mode():  # a stepper's cache changes in place in that mode only (as decoding runs it)
        for r in (runner, eager):
            r.prefill([[3, 4, 5], [6, 7], [8]])
        where = graphed._where(graphed.cache_tensors(runner.cache))
        for accept in ([2, 0, 4], [1, 1, 1], [4, 3, 0], [3, 4, 4], [1, 2, 3]):  # past the kept updates' room
            tokens = torch.randint(3, 90, (3, 7), generator=torch.Generator().manual_seed(sum(accept)))
            tokens[:, 4:] = MASK
            for r in (runner, eager):
                outs.append(r.rows(tokens, 4, record=True))
                r.commit_recorded(torch.tensor(accept))
            assert graphed._where(graphed.cache_tensors(runner.cache)) == where
        for _ in range(2):
            outs += [r.append(torch.tensor([[10], [11], [12]])) for r in (runner, eager)]
    assert graphed._where(graphed.cache_tensors(runner.cache)) == where
    assert runner.hidden_states.captures == 2 and not runner.hidden_states.failed  # a round's and a step's
    for got, want in zip(outs[::2], outs[1::2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(graphed.cache_tensors(runner.cache), graphed.cache_tensors(eager.cache)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_decode_keeps_its_graphs_for_the_next_call_of_that_shape(flare_models, monkeypatch):
    """``decode`` runs on a kept runner where decoding is graphed (a new cache would need graphs of its own): a
    second call of the same shape captures nothing, and gives the same tokens."""
    model = flare_models["qwen3_5"]
    first, _ = _decode(model, "ar_trust:redraft=last:pause=0", PROMPTS, monkeypatch, "emulate")
    (runner,) = KEPT[model].values()
    captures = runner.hidden_states.captures
    again, _ = _decode(model, "ar_trust:redraft=last:pause=0", PROMPTS, monkeypatch, "emulate")
    assert again == first and captures > 0 and runner.hidden_states.captures == captures
    assert list(KEPT[model].values()) == [runner]


def test_prefills_and_the_least_recently_used_graphs(flare_models, monkeypatch):
    """A prefill over every slot (eager: more rows than a graph takes) writes the states in place, so the graphs
    stay valid; past MAX_GRAPHS the least recently used graph goes, not the one in use."""
    model = flare_models["qwen3_5"]
    monkeypatch.setenv(GRAPHS_ENV, "emulate")
    monkeypatch.setattr(graphed, "MAX_GRAPHS", 2)
    runner = Stepper(model, 2, 64).runner
    forward = runner.hidden_states
    with torch.inference_mode():  # a stepper's cache changes in place in that mode only (as decoding runs it)
        runner.prefill([[3, 4, 5], [6, 7]])
        runner.append(torch.tensor([[8], [9]]))
        runner.prefill([list(range(3, 23)), list(range(4, 24))])  # 20 rows into both slots
        runner.append(torch.tensor([[8], [9]]))
        assert forward.captures == 1
        for rows in (2, 1, 3, 1):  # 1-row graph used again before the 3-row one is captured: the 2-row one goes
            runner.append(torch.full((2, rows), 5))
    assert forward.captures == 3 and [key[2][1] for key in forward.graphs] == [3, 1]


def test_the_masks_a_graph_reads_are_never_dropped():
    """A rows forward's chain mask is kept per length for good up to AFTER_KEPT_ROWS (a graph reads it by
    address), however many other lengths come between; longer ones are made afresh."""
    from flare.ops.gated_delta import rows

    kept = rows._after(5, torch.device("cpu"))
    for T in range(1, 3 * rows.AFTER_KEPT_ROWS):
        rows._after(T, torch.device("cpu"))
    assert rows._after(5, torch.device("cpu")) is kept
    long = rows.AFTER_KEPT_ROWS + 1
    assert rows._after(long, torch.device("cpu")) is not rows._after(long, torch.device("cpu"))
