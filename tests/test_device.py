"""Device and dtype choice of the front doors."""

from __future__ import annotations

import pytest
import torch

from flare.device import cpu_path, describe, native_bf16, pick_device, pick_dtype


def test_cpu_path_and_dtype_choice_agree(monkeypatch):
    monkeypatch.setenv("FLARE_DTYPE", "auto")
    cpu = torch.device("cpu")
    assert cpu_path() in ("amx", "avx512_bf16", "avx512", "avx2", "generic")
    assert native_bf16(cpu) == (cpu_path() in ("amx", "avx512_bf16"))
    assert pick_dtype(cpu, None, torch.float32) == (torch.bfloat16 if native_bf16(cpu) else torch.float32)
    assert pick_dtype(cpu, "float32", torch.bfloat16) == torch.float32  # asked for wins
    assert pick_dtype(cpu, torch.float16, torch.float32) == torch.float16
    assert describe(cpu, torch.bfloat16) == f"cpu ({cpu_path()}) bfloat16"


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
    from flare.engine import LLM

    monkeypatch.setenv("FLARE_DTYPE", "auto")
    llm = LLM.from_dir(tiny_dirs["llama"], device="cpu")
    assert llm.model.dtype == (torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32)
    assert LLM.from_dir(tiny_dirs["llama"], device="cpu", dtype="float32").model.dtype == torch.float32
