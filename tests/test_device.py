"""Device and dtype choice of the front doors."""

from __future__ import annotations

import pytest
import torch

from flare.device import (CPU_BF16_MIN_PARAMS, cpu_path, describe, native_bf16, pack_linears, pick_device,
                          pick_dtype)


def test_cpu_path_and_dtype_choice_agree(monkeypatch):
    monkeypatch.setenv("FLARE_DTYPE", "auto")
    cpu = torch.device("cpu")
    assert cpu_path() in ("amx", "avx512_bf16", "avx512", "avx2", "generic")
    assert native_bf16(cpu) == (cpu_path() in ("amx", "avx512_bf16"))
    assert pick_dtype(cpu, None, torch.float32) == (torch.bfloat16 if native_bf16(cpu) else torch.float32)
    big = CPU_BF16_MIN_PARAMS
    assert pick_dtype(cpu, None, torch.float32, big) == (torch.bfloat16 if native_bf16(cpu) else torch.float32)
    assert pick_dtype(cpu, "float32", torch.bfloat16) == torch.float32  # asked for wins
    assert pick_dtype(cpu, torch.float16, torch.float32) == torch.float16
    packed = ", packed linears" if pack_linears(cpu, torch.bfloat16) else ""
    assert describe(cpu, torch.bfloat16) == f"cpu ({cpu_path()}) bfloat16{packed}"
    packed = ", packed linears" if pack_linears(cpu, torch.float32) else ""
    assert describe(cpu, torch.float32) == f"cpu ({cpu_path()}) float32{packed}"
    assert pack_linears(cpu, torch.float32) == torch.backends.mkldnn.is_available()  # fp32: on any such CPU


def test_describe_names_packed_fp32_linears_only_where_a_model_has_one_large_enough():
    from torch import nn

    from flare.device import FP32_MIN_NUMEL

    cpu = torch.device("cpu")
    small = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, FP32_MIN_NUMEL // 16 - 1))
    large = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, FP32_MIN_NUMEL // 16))
    packed = ", packed linears" if pack_linears(cpu, torch.float32) else ""
    column = ", column-major linears" if pack_linears(cpu, torch.float32) else ""
    assert describe(cpu, torch.float32, small) == f"cpu ({cpu_path()}) float32{column}"
    assert describe(cpu, torch.float32, large) == describe(cpu, torch.float32) == f"cpu ({cpu_path()}) float32{packed}"


def test_a_small_model_keeps_its_stored_dtype_on_a_cpu_even_with_native_bf16(monkeypatch):
    # Measured: below CPU_BF16_MIN_PARAMS a CPU decode step is dispatch-bound and bf16 is slower.
    import flare.device as device

    monkeypatch.setenv("FLARE_DTYPE", "auto")
    monkeypatch.setattr(device, "native_bf16", lambda d: True)
    cpu = torch.device("cpu")
    assert pick_dtype(cpu, None, torch.float32, CPU_BF16_MIN_PARAMS - 1) == torch.float32
    assert pick_dtype(cpu, None, torch.float32, CPU_BF16_MIN_PARAMS) == torch.bfloat16
    assert pick_dtype(cpu, "bfloat16", torch.float32, 10) == torch.bfloat16  # asked for wins
    assert pick_dtype(torch.device("cuda"), None, torch.float32, 10) == torch.bfloat16  # GPUs: always


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_a_missing_cuda_device_falls_back_to_the_cpu_and_says_so():
    assert pick_device(None).type == "cpu" and pick_device("cpu").type == "cpu"
    with pytest.warns(UserWarning, match="no CUDA device: running on the CPU"):
        assert pick_device("cuda:0").type == "cpu"


def test_the_default_dtype_can_be_pinned(monkeypatch):
    cpu = torch.device("cpu")
    for value, want in [("stored", torch.float16), ("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        monkeypatch.setenv("FLARE_DTYPE", value)
        assert pick_dtype(cpu, None, torch.float16) == want
    monkeypatch.setenv("FLARE_DTYPE", "fp8")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        pick_dtype(cpu, None, torch.float32)


def test_front_doors_load_in_the_chosen_dtype(tiny_dirs, monkeypatch):
    import flare.device as device
    from flare.engine import LLM

    monkeypatch.setenv("FLARE_DTYPE", "auto")
    llm = LLM.from_dir(tiny_dirs["llama"], device="cpu")
    assert llm.model.dtype == torch.float32  # a tiny model: dispatch-bound, bf16 would only add casts
    monkeypatch.setattr(device, "CPU_BF16_MIN_PARAMS", 0)
    llm = LLM.from_dir(tiny_dirs["llama"], device="cpu")
    assert llm.model.dtype == (torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32)
    assert LLM.from_dir(tiny_dirs["llama"], device="cpu", dtype="float32").model.dtype == torch.float32


_DENORMALS = """
import sys, torch
if sys.argv[1] == "cli":  # the flare command, as its first act
    import flare.cli
    try:
        flare.cli.main(["--help"])
    except SystemExit:
        pass
    import platform
    flushed = platform.machine() in ("x86_64", "AMD64")  # where the CPU has the flag for certain
else:
    import flare.device
    flushed = flare.device.flush_denormals()
torch.set_num_threads(2)
x = torch.full((1 << 21,), 1e-39)  # denormal in fp32; the product runs in chunks on every intra-op thread
import flare.ops.precision
print(flushed, int((x * 1.0).count_nonzero()), int((x[:4] * 1.0).count_nonzero()),
      flare.ops.precision.DENORMALS_FLUSHED[0])
"""


@pytest.mark.parametrize("how, env", [("call", "1"), ("call", "0"), ("cli", "1")])
def test_denormals_are_flushed_on_every_intra_op_thread(how, env):
    """``flush_denormals`` before torch starts its intra-op threads flushes denormals to zero on every one of them
    (``FLARE_FLUSH_DENORMAL=0`` keeps them), and the flare command calls it first; a fresh interpreter each, since
    the flag is the process's. ``flare.ops.precision.DENORMALS_FLUSHED`` says whether it is set."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _DENORMALS, how], capture_output=True, text=True, check=True,
                         env={**os.environ, "FLARE_FLUSH_DENORMAL": env}).stdout.split()
    if env == "0":
        assert out == ["False", str(1 << 21), "4", "False"]
    elif out[0] == "True":  # a CPU that has the flag (and the ops that zero tiny values know it)
        assert out[1:] == ["0", "0", "True"]


_HEAP = """
import ctypes, json, sys, torch
import flare.heap

kept = flare.heap.keep_freed_memory()

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

info = ctypes.CDLL(None).mallinfo2
info.restype = MallInfo2
x = torch.ones(5 << 20)  # 20 MiB: above glibc's first mmap threshold, below the one set
del x
print(json.dumps({"kept": kept, "free_in_heap": info().fordblks}))
"""


@pytest.mark.parametrize("env", ["1", "0"])
def test_freed_memory_is_kept_for_reuse(env):
    """With the settings, a freed 20 MiB tensor's memory stays in the heap for the next one (no fresh pages to
    fault in); with FLARE_KEEP_FREED_MEMORY=0, glibc's default hands it back."""
    import json
    import os
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    env_vars = dict(os.environ, FLARE_KEEP_FREED_MEMORY=env)
    out = subprocess.run([sys.executable, "-c", _HEAP], capture_output=True, text=True, env=env_vars, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["kept"] == (env == "1")
    if env == "1":
        assert got["free_in_heap"] >= 20 << 20
    else:
        assert got["free_in_heap"] < 20 << 20
