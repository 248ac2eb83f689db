"""benchmarks/gpu_check.sh runs end to end on the CPU at the tiny size and writes ONE JSON file with every
section (the GPU-only tests, bench_modes at batch 1 and 8 with the transformers comparison, the memory floor)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODES = {"causal", "ar_trust", "diffusion_trust", "low_confidence", "llada"}


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="gpu_check.sh needs bash and coreutils' timeout")
@pytest.mark.slow  # ~45 s: every section of the script, each a process of its own
def test_gpu_check_runs_on_the_cpu_and_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    # Where the checkout has no .venv the script runs `python3`: make that this interpreter.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--out", str(out),
                          "--logs", str(tmp_path / "logs")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    report = json.loads(out.read_text())
    sections = {"tests", "modes", "memory_floor", "static", "graphs", "attention", "train"}
    assert sections | {"env"} <= set(report) and report["ok"]
    assert set(report["env"]["seconds"]) == sections
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {f"{s}.log" for s in report["env"]["seconds"]}

    tests = report["tests"]
    assert tests["files"] and tests["cases"], "no CUDA-only test was found or selected"
    assert tests["failures"] == tests["errors"] == 0

    modes = report["modes"]["result"]
    assert modes["batches"] == [1, 8] and modes["model"]["size"] == "tiny"
    assert {(m["mode"], m["batch"]) for m in modes["modes"]} == {(m, b) for m in MODES for b in (1, 8)}
    assert all(m["valid"] and m["fwd_cost"] > 0 for m in modes["modes"])
    assert [r["batch"] for r in modes["transformers"]] == [1, 8]
    assert all(r["flare_ms"] > 0 and r["transformers_ms"] > 0 for r in modes["transformers"])

    floor = report["memory_floor"]["result"]
    assert floor["bandwidth_GBps"] > 0 and [r["batch"] for r in floor["batches"]] == [1, 8]
    assert all(r["floor_ms"] > 0 and r["measured_ms"] > 0 and r["weight_bytes"] > 0 for r in floor["batches"])

    static = report["static"]["result"]["results"]
    assert [(r["batch"], r["rows"]) for r in static] == [(1, 1), (1, 7), (8, 1), (8, 7)]
    assert all(r["eager_ms"] > 0 and "graph_ms" not in r for r in static)  # CUDA graphs: CUDA only

    graphs = report["graphs"]["result"]  # emulated on the CPU: the same bookkeeping, the eager tokens
    pinned = ("ar_trust:redraft=every:pause=0", "ar_trust:redraft=tree:pause=0")
    assert {(m["mode"], m["batch"]) for m in graphs["modes"]} == {(m, b) for m in ("causal", "ar_trust") + pinned
                                                                for b in (1, 8)}
    assert all(m["valid"] and m["fwd_cost"] > 0 for m in graphs["modes"])  # graphed forwards timed too
    # causal steps graphed (AR-Trust on a random model may draft every round: rows forwards, not graphed yet)
    assert {m["forward"] for m in graphs["modes"] if m["mode"] == "causal"} == {"FLARE_CUDA_GRAPHS=emulate"}
    assert {m["forward"] for m in modes["modes"]} == {"eager"}

    ops = report["attention"]["result"]["ops"]  # per call: 3 shapes x batch 1, 8 x 1, 7 rows at 32 keys in fp32
    assert len(ops) == 12 and all(r["other"] == "grouped" and r["folded_us"] > 0 and r["max_diff"] < 1e-5 for r in ops)

    train = report["train"]["result"]
    assert train["length"] == 96 and train["after"]["peak"] > 0 and train["after"]["tokens_per_s"] > 0


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="gpu_check.sh needs bash and coreutils' timeout")
def test_gpu_check_keeps_to_its_budget(tmp_path):
    """With too little time for a section, it is recorded as not run and the JSON is written anyway (a device
    command killed at its limit would bring nothing back). A budget under one section's minimum runs none."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    start = time.perf_counter()
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--out", str(out),
                          "--budget", "3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and time.perf_counter() - start < 30, res.stderr[-2000:]
    report = json.loads(out.read_text())
    sections = ("tests", "graphs", "attention", "modes", "static", "memory_floor", "train")
    assert not report["ok"] and all(report[s]["rc"] == 124 and report[s]["seconds"] == 0 for s in sections)
    assert all("budget" in report[s]["log_tail"] for s in sections)


def test_bench_block_mask_runs_at_a_tiny_size(tmp_path):
    """Both builders in their own subprocesses at T = 48, the tiled one alone at T = 96 (tile 16): equal tiles."""
    out = tmp_path / "block_mask.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_block_mask.py"), "--length", "96",
                          "--compare", "48", "--tile", "16", "--doc-length", "8", "--repeats", "1", "--device", "cpu",
                          "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(r["builder"], r["T"]) for r in report["runs"]] == [
        ("create_block_mask", 48), ("flare.block_mask", 48), ("flare.block_mask", 96)]
    assert report["ratios"][0]["same_tiles"] and all(r["ms"] > 0 for r in report["runs"])
    assert "same tiles: yes" in res.stdout


def test_linear_paths_benchmark_measures_every_path_it_has():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_linear_paths

    results = bench_linear_paths.main(["--size", "tiny", "--rows", "1,5", "--repeats", "1", "--idle-ms", "0.5"])
    assert set(results) == {"F.linear fp32", "F.linear fp32 col-major", "F.linear bf16", "oneDNN packed bf16",
                            "oneDNN packed fp32", "MKL packed fp32"}
    for name, r in results.items():  # a path this torch lacks says why; every other one has a time per M
        assert isinstance(r, str) and r.startswith("unavailable") or set(r) == {1, 5} and min(r.values()) > 0, name


def test_bench_idle_blocks_runs_at_a_tiny_size(tmp_path):
    """Both layouts timed on the synthetic prompt-heavy batch; the dropped one runs fewer rows."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_idle_blocks.py"), "--batch", "1",
                          "--seq-len", "96", "--block-size", "4", "--repeats", "1", "--threads", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    ratio = float(res.stdout.split("dropped / full: rows ")[1].split("x")[0])
    assert 0 < ratio < 0.7 and "| full | 288 |" in res.stdout


def test_bench_commit_runs_its_four_arms_at_a_tiny_size(tmp_path):
    """Kept all layers at once and layer by layer, written every round, replayed: the same caches (checked by the
    script), a time each, and the commit's own where there is one."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_commit.py"), "--size", "tiny",
                          "--rounds", "6", "--batch", "3"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    table = res.stdout.split("commit ms\n")[1].split("SUMMARY")[0].splitlines()
    assert [" ".join(r.split()[:2]) for r in table] == ["kept, all", "kept as", "states written", "replay accepted"]
    assert all(float(r.split()[-3]) > 0 for r in table) and table[-1].split()[-1] == "-"
    assert all(float(r.split()[-1]) > 0 for r in table[:2]) and "SUMMARY: a round with the commits kept" in res.stdout


def test_bench_static_step_traces_each_forward_as_one_graph(tmp_path):
    """Both static forwards of the tiny model through dynamo with fullgraph (no code generated, so no compiler
    needed): one graph each, the same picks as eager."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_static_step.py"), "--size", "tiny",
                          "--batch", "1,3", "--backend", "eager", "--iters", "2", "--repeats", "1", "--prompt", "6"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.strip().startswith(("1 ", "3 "))]
    assert [(r[0], r[1], r[3]) for r in rows] == [("1", "causal", "1"), ("1", "verify", "7"), ("3", "causal", "1"),
                                                 ("3", "verify", "7")]
    assert all(r[-1].split("/")[0] == r[-1].split("/")[2] for r in rows)  # compiled picks == eager picks
    assert "SUMMARY: compiled / eager:" in res.stdout
    # Without a compiled arm (and, on the CPU, no CUDA-graph arm): the eager forwards alone, in the JSON too.
    out = tmp_path / "static.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_static_step.py"), "--size", "tiny",
                          "--batch", "2", "--backend", "none", "--iters", "2", "--repeats", "1", "--prompt", "4",
                          "--device", "cpu", "--json", str(out)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["forward"], r["rows"]) for r in results] == [("causal step", 1), ("verify N+M", 7)]
    assert all(r["eager_ms"] > 0 and "compiled_ms" not in r and "graph_ms" not in r for r in results)


def test_bench_modes_warms_compiled_decoding_up_before_timing(tmp_path):
    """With FLARE_COMPILE the warm-up runs whole decodes until one compiles no graph, and says what it cost."""
    env = {**os.environ, "FLARE_COMPILE": "eager"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_modes.py"), "--size", "tiny", "--modes",
                          "causal,ar_trust", "--batch", "2", "--new-tokens", "4", "--repeats", "1", "--no-transformers",
                          "--no-profile"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "compiled (eager): " in res.stdout and "compile warm-up" in res.stdout


def test_bench_modes_samples_unseeded_when_asked(tmp_path):
    """--temperature / --top-p: every mode samples (unseeded, so AR-Trust is paced), its tokens not compared."""
    out = tmp_path / "modes.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_modes.py"), "--size", "tiny", "--modes",
                          "causal,ar_trust", "--batch", "2", "--new-tokens", "6", "--repeats", "1", "--no-transformers",
                          "--no-profile", "--temperature", "0.8", "--top-p", "0.9", "--json", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "temperature 0.8, top-p 0.9, unseeded" in res.stdout and "sampled (not compared" in res.stdout
    record = json.loads(out.read_text())
    assert (record["temperature"], record["top_p"]) == (0.8, 0.9)
    assert all(m["valid"] and m["exact"] is None for m in record["modes"] if m["mode"] == "ar_trust")


def test_step_phases_split_each_step_and_leave_nothing_patched(flare_models):
    """The phases of a step add up to it; causal steps commit nothing, AR-Trust's rounds do; prefills (admissions)
    are left out; the wrapped methods are the originals again afterwards."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _step_phases import PHASES, step_phases
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from flare.decoding import SamplingParams
    from flare.engine import decode
    from flare.engine.runner import CachedRunner
    from flare.engine.stepper import Stepper

    model = flare_models["qwen3_5"]
    before = (Stepper.step, Stepper.sync, CachedRunner.rows, CachedRunner.commit_recorded, type(model).context)
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    split = {}
    for mode in ("causal", "ar_trust:pause=0"):
        with step_phases() as acc:
            res = decode(model, [[5, 6, 7, 8], [9, 10, 11]], params, mode)
        split[mode] = acc
        assert acc["steps"] == res.forwards - 1  # one admission's prefill for both prompts, then steps
        assert all(acc[p] >= 0 for p in PHASES if p != "other")
        assert sum(acc[p] for p in PHASES) == pytest.approx(acc["step"])
        assert acc["forward"] > 0 and acc["consume"] > 0 and acc["host read"] > 0
    assert split["causal"]["commit"] == 0 and split["ar_trust:pause=0"]["commit"] > 0
    assert (Stepper.step, Stepper.sync, CachedRunner.rows, CachedRunner.commit_recorded, type(model).context) == before


def test_bench_modes_records_its_profile_in_the_json(tmp_path):
    """Where AR-Trust's ceiling is below the goal the profile runs, and --json keeps what it printed: the forward's
    split by module and each step's phases, per mode, at the batch it profiled."""
    out = tmp_path / "modes.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_modes.py"), "--size", "tiny", "--modes",
                          "causal,ar_trust", "--batch", "2", "--new-tokens", "6", "--repeats", "1", "--no-transformers",
                          "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    record = json.loads(out.read_text())
    unmet = [int(b) for b, c in record["ar_trust_ceiling"].items() if c < 2.5]
    profile = record["profile"]
    assert (profile is not None) == bool(unmet)
    if profile is not None:
        assert profile["batch"] == max(unmet) and "per step of one decode" in res.stdout
        for mode in ("causal", "ar_trust"):
            phases = profile["step_phases_ms"][mode]
            assert phases["steps"] > 0 and phases["forward"] > 0 and phases["step"] >= phases["forward"]
            assert profile["forward_split_ms"][mode]["total"] > 0
        assert profile["step_phases_ms"]["causal"]["commit"] == 0


def test_bench_attention_times_both_calls_and_a_decode_step_at_a_tiny_size(tmp_path):
    """Per op every shape, dtype, batch and row count, a ratio and a difference; per step fold on and off."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--contexts", "32",
                          "--dtypes", "float32", "--repeats", "1", "--threads", "1", "--size", "tiny",
                          "--decode-contexts", "8", "--batch", "2", "--steps", "3"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ops = [line.split() for line in res.stdout.splitlines() if line.startswith(("demo ", "SmolLM2", "Qwen3.5"))]
    assert len(ops) == 3 * 2 * 2 and all(float(r[7].rstrip("x")) > 0 for r in ops)
    assert all(float(r[8]) < 1e-5 for r in ops)  # fp32: the same values
    steps = res.stdout.split("greedy tokens\n")[1].splitlines()
    assert [r.split()[:2] for r in steps] == [["8", "1"], ["8", "2"]]
    assert all(r.split()[-1] == "identical" for r in steps)  # fp32 on a tiny model: the same greedy tokens
