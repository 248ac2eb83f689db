#!/usr/bin/env bash
# One GPU check, within a time budget (default 9 minutes on CUDA), that writes ONE JSON file with every result:
#   tests         the CUDA-only tests (test files that skip without CUDA, selected with -k "cuda or flex or gpu")
#   graphs        bench_modes.py, causal and AR-Trust (paced, and pinned to a group per acceptance point without and
#                 with tree's branch: what its 4 more rows cost a round where rows are nearly free), with
#                 FLARE_CUDA_GRAPHS=1 (emulate on the CPU): decoding with its forwards replayed from CUDA graphs
#                 (flare.engine.graphed)
#   attention     bench_attention.py: decoding's masked attention with its key/value heads expanded (what CUDA runs)
#                 against the query heads folded into rows (what the CPU runs), per call, at 512 and 4,096 keys
#   modes         bench_modes.py on the real-sized random model (Qwen3.5-0.8B-shaped) in bf16 at batch 1 and 8:
#                 cost per forward of every mode vs causal, and causal ms/step vs transformers on the same weights
#   static        bench_static_step.py --backend none: a causal step and a verify forward with static shapes,
#                 eagerly and (on CUDA) replayed from a CUDA graph, batch 1 and 8
#   memory_floor  memory_floor.py: causal decode ms/step vs (weight + state bytes) / copy bandwidth, batch 1 and 8
#   train         bench_train_memory.py: one FLARE training step of a random Qwen3.5-2B-shaped model (24 layers, bf16
#                 compute, fp32 masters) at L = 4,096: step time, tokens/s and peak memory
#   env           python, torch, device, and the seconds each section took
# Each section records its exit status and, when it failed, the tail of its log; the script exits non-zero when
# any section failed. It installs nothing: it runs .venv/bin/python when present, else python3 (else python).
#
#   benchmarks/gpu_check.sh [--device cuda|cpu] [--out FILE] [--logs DIR] [--size tiny|small|real] [--new-tokens N]
#       [--budget SECONDS]
#
# --logs DIR keeps each section's whole log there (DIR/NAME.log), beside the tails the JSON holds for failures.
# --budget: the seconds all sections may take together (default 540 on CUDA, 900 on the CPU): each section's limit
# is cut to what is left, and a section with nothing left is recorded as not run (exit 124), so the JSON is always
# written inside the budget. Sections run in the order above, the newest measurements first.
#
# --device cpu runs the same sections at a small size (tiny, 4 new tokens, one round): the smoke test
# (tests/test_benchmarks_smoke.py) runs it that way.
set -u
cd "$(dirname "$0")/.."

PY=python3
command -v python3 >/dev/null || PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
# flare from this checkout even where it is not installed (the scripts run from benchmarks/).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=cuda
OUT=gpu_check.json
SIZE=""
NEW=""
LOGS=""
BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --logs) LOGS=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --new-tokens) NEW=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {print}' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$DEVICE" = cpu ]; then
  SIZE=${SIZE:-tiny}; NEW=${NEW:-4}; REPEATS=1; DTYPE=auto; THREADS=1; STEPS=4
  T_TESTS=120; T_MODES=240; T_FLOOR=120; T_STATIC=120; T_GRAPHS=120; T_TRAIN=120; T_ATTN=60
  ATTN_ARGS="--contexts 32 --dtypes float32 --repeats 1"
  GRAPHS=emulate; BUDGET=${BUDGET:-900}
  TRAIN_SHAPE="--hidden 64 --intermediate 128 --vocab 512 --layers 2 --length 96"
else
  SIZE=${SIZE:-real}; NEW=${NEW:-32}; REPEATS=3; DTYPE=bfloat16; THREADS=4; STEPS=32
  # 381 s on an H200 for tests, modes, memory_floor and train (the first run); the budget keeps the whole inside
  # one device command of 10 minutes, start-up included.
  T_TESTS=200; T_MODES=160; T_FLOOR=60; T_STATIC=60; T_GRAPHS=150; T_TRAIN=90; T_ATTN=30
  ATTN_ARGS="--contexts 512,4096 --dtypes bfloat16 --repeats 5"
  GRAPHS=1; BUDGET=${BUDGET:-540}
  TRAIN_SHAPE="--layers 24 --length 4096"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

DEADLINE=$((SECONDS + BUDGET))

# section NAME TIMEOUT CMD...: run CMD under a time limit (cut to what is left of the budget), keep its log, exit
# status and seconds.
section() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "not run: the budget of $BUDGET s was spent" >"$WORK/$name.log"
    echo "124 0" >"$WORK/$name.status"
    echo "== $name: not run (budget spent)" >&2
    return
  fi
  echo "== $name: $*" >&2
  local start=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "$rc $((SECONDS - start))" >"$WORK/$name.status"
  tail -n 3 "$WORK/$name.log" >&2
  echo "== $name: exit $rc in $((SECONDS - start)) s" >&2
}

# Test files that skip without CUDA (GPU-only tests), and within them the CUDA / flex / GPU tests. Among them
# tests/ops/test_gated_delta_fla.py: fla-vs-torch GDN parity, skipped with its reason (-rs) where fla is not installed.
CUDA_TESTS=$(grep -rlE "not (torch\.)?cuda\.is_available\(\)" tests --include='*.py' | sort | tr '\n' ' ')
echo "$CUDA_TESTS" >"$WORK/tests.files"
if [ -n "$CUDA_TESTS" ]; then
  # shellcheck disable=SC2086
  section tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -rs -k "cuda or flex or gpu" \
    --junitxml="$WORK/tests.xml" $CUDA_TESTS
else
  echo "5 0" >"$WORK/tests.status"
  echo "no test file skips without CUDA" >"$WORK/tests.log"
fi

section graphs "$T_GRAPHS" env FLARE_CUDA_GRAPHS="$GRAPHS" "$PY" benchmarks/bench_modes.py --size "$SIZE" --batch 8 \
  --device "$DEVICE" --dtype "$DTYPE" --new-tokens "$NEW" --repeats "$REPEATS" --threads "$THREADS" --no-profile \
  --modes causal,ar_trust,ar_trust:redraft=every:pause=0,ar_trust:redraft=tree:pause=0 --no-transformers \
  --json "$WORK/graphs.json"

# shellcheck disable=SC2086
section attention "$T_ATTN" "$PY" benchmarks/bench_attention.py --device "$DEVICE" --threads "$THREADS" $ATTN_ARGS \
  --json "$WORK/attention.json"

section modes "$T_MODES" "$PY" benchmarks/bench_modes.py --size "$SIZE" --batch 8 --device "$DEVICE" \
  --dtype "$DTYPE" --new-tokens "$NEW" --repeats "$REPEATS" --threads "$THREADS" --no-profile \
  --json "$WORK/modes.json"

section static "$T_STATIC" "$PY" benchmarks/bench_static_step.py --size "$SIZE" --batch 1,8 --device "$DEVICE" \
  --dtype "$DTYPE" --backend none --threads "$THREADS" --json "$WORK/static.json"

section memory_floor "$T_FLOOR" "$PY" benchmarks/memory_floor.py --size "$SIZE" --batch 1,8 --device "$DEVICE" \
  --dtype "$DTYPE" --steps "$STEPS" --repeats "$REPEATS" --threads "$THREADS" --json "$WORK/memory_floor.json"

# shellcheck disable=SC2086
section train "$T_TRAIN" "$PY" benchmarks/bench_train_memory.py --device "$DEVICE" --arms after $TRAIN_SHAPE \
  --threads "$THREADS" --json "$WORK/train.json"

if [ -n "$LOGS" ]; then
  mkdir -p "$LOGS" && cp "$WORK"/*.log "$LOGS"/
fi

"$PY" - "$WORK" "$OUT" "$DEVICE" "$SIZE" "$DTYPE" <<'EOF'
import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, out, device, size, dtype = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]


def status(name):
    rc, seconds = (int(x) for x in (work / f"{name}.status").read_text().split())
    return {"rc": rc, "seconds": seconds}


def failed_tail(name, rc, ok=(0,)):
    return {} if rc in ok else {"log_tail": (work / f"{name}.log").read_text()[-4000:]}


def tests():
    s = status("tests")
    s["files"] = (work / "tests.files").read_text().split()
    s["selection"] = "-k 'cuda or flex or gpu'"
    cases = []
    if (work / "tests.xml").exists():
        for case in ET.parse(work / "tests.xml").iter("testcase"):
            kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": kind,
                          "seconds": float(case.get("time") or 0)})
    s["cases"] = cases
    for kind in ("passed", "failure", "error", "skipped"):
        s[kind if kind in ("passed", "skipped") else kind + "s"] = sum(c["outcome"] == kind for c in cases)
    # 5: pytest collected nothing under the selection, which is no failure of the code.
    s["ok"] = s["rc"] in (0, 5)
    s.update(failed_tail("tests", s["rc"], (0, 5)))
    return s


def bench(name):
    s = status(name)
    path = work / f"{name}.json"
    s["result"] = json.loads(path.read_text()) if path.exists() else None
    s["ok"] = s["rc"] == 0 and s["result"] is not None
    s.update(failed_tail(name, s["rc"]))
    return s


def env():
    info = {"python": platform.python_version(), "device_asked": device, "size": size, "dtype_asked": dtype}
    try:
        import torch

        from flare.device import describe, pick_device

        d = pick_device(device)
        info.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(), device=str(d),
                    describe=describe(d, torch.bfloat16 if dtype == "bfloat16" else torch.float32))
        if d.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(d)
    except Exception as e:  # the JSON is still written, saying why
        info["error"] = f"{type(e).__name__}: {e}"
    return info


SECTIONS = ("tests", "graphs", "attention", "modes", "static", "memory_floor", "train")
report = {"env": env(), "tests": tests(), **{name: bench(name) for name in SECTIONS[1:]}}
if report["modes"]["result"]:
    report["env"]["describe"] = report["modes"]["result"]["describe"]  # the device and dtype the benchmark ran in
report["env"]["seconds"] = {k: report[k]["seconds"] for k in SECTIONS}
report["ok"] = all(report[k]["ok"] for k in SECTIONS)
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=1) + "\n")
print(f"wrote {out}: " + ", ".join(f"{k} {'ok' if report[k]['ok'] else 'FAILED'}" for k in SECTIONS))
sys.exit(0 if report["ok"] else 1)
EOF
