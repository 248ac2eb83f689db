"""Where and in what precision a front door runs: the device asked for when it exists, else the one that does;
bf16 where the hardware computes it natively and the model is large enough to gain from it, else the
checkpoint's own dtype."""

from __future__ import annotations

import functools
import os
import warnings

import torch

from flare.ops import precision

# "0" keeps denormal floats (see ``flush_denormals``), for A-B measurements.
FLUSH_DENORMAL_ENV = "FLARE_FLUSH_DENORMAL"


def flush_denormals() -> bool:
    """Treat denormal floats (below 1.2e-38 in fp32 and bf16) as zero in this process; returns whether the CPU
    does so (False with ``FLARE_FLUSH_DENORMAL=0``). An x86 core takes a slow path for every operation on a
    denormal, and the gated delta rule makes them: decays e^{G_i - G_j} of a fast-forgetting head and the state
    entries they shrink (2-3% of what its rows pass reads on the demo checkpoint and on a random Qwen3.5-shaped
    0.75B model). There one triangular solve of a verify round took 1 ms instead of 0.14 and an AR-Trust round of
    8 sequences 207 instead of 224 ms (bf16, AMX); an AR-Trust decode of 8 sequences on the demo model 99 instead
    of 110 ms. Values that small change nothing a model computes.

    The flag is the CPU's, per thread: torch's intra-op threads copy it from the thread that starts them and cannot
    be reached after, so call this first thing in a process, before torch runs a parallel op (called later, only the
    calling thread flushes). flare's own processes do, through ``prepare_process`` (the ``flare`` command, the
    server's engine process, the SmolLM2 recipe, the decode benchmarks); an ``Engine`` made in another program
    leaves the process's floating-point state alone. It is global: a library in the same process that needs
    denormals (hypothesis's float strategies refuse to run) sees them flushed."""
    if os.environ.get(FLUSH_DENORMAL_ENV, "1") == "0":
        return False
    flushed = torch.set_flush_denormal(True)
    precision.DENORMALS_FLUSHED[0] = flushed  # (what the ops that zero tiny values themselves look at)
    return flushed


def prepare_process() -> dict[str, bool]:
    """What flare's own processes do first (the ``flare`` command, the server's engine process, the recipe, the
    decode benchmarks): flush denormals (``flush_denormals``, before torch starts its intra-op threads) and keep
    freed memory for reuse (``flare.heap.keep_freed_memory``). Returns which took effect."""
    from flare.heap import keep_freed_memory

    return {"flush_denormals": flush_denormals(), "keep_freed_memory": keep_freed_memory()}


# Pins the default decoding dtype where no --dtype is given: "auto" (the hardware's choice), "stored" (the
# checkpoint's own), or a dtype name. The test suite sets "stored" so that it runs alike on every CPU.
DTYPE_ENV = "FLARE_DTYPE"


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """None: CUDA when available, else the CPU. A CUDA device asked for on a machine without CUDA (lm-eval's
    command line asks for one by default) runs on the CPU instead, with a warning that says so."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"device {str(requested)!r} was asked for but this machine has no CUDA device: running on "
                      "the CPU", stacklevel=2)
        return torch.device("cpu")
    return device


@functools.cache
def cpu_path() -> str:
    """The fastest matmul path of this CPU for decoding: ``amx`` (AMX tiles with bf16), ``avx512_bf16``,
    ``avx512`` or ``avx2`` (no native bf16: bf16 matmuls are emulated and slower than fp32), else ``generic``."""
    cpu = torch.cpu
    if _probe(cpu, "_is_amx_tile_supported") and _probe(cpu, "_is_avx512_bf16_supported"):
        return "amx"
    for name in ("avx512_bf16", "avx512", "avx2"):
        if _probe(cpu, f"_is_{name}_supported"):
            return name
    return "generic"


def _probe(module, name: str) -> bool:
    fn = getattr(module, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware here (CUDA with bf16, or a CPU with AMX or AVX-512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_path() in ("amx", "avx512_bf16")


# "0" turns packing off (every linear through F.linear), for A-B measurements: the outputs are the same.
PACKED_LINEARS_ENV = "FLARE_PACKED_LINEARS"


# Below this many weight elements an fp32 linear is faster through F.linear than packed (a oneDNN call's fixed cost,
# ~18 us against ~3 us; AVX2 EPYC, 2 threads: 256 x 256 is even, 128 x 128 2x slower packed, 512 x 512 1.4x faster
# packed at 1 row; AMX Xeon, one thread: 512 x 128 5 / 16 us at 1 row, 39 / 48 at 56 rows, and the demo model, whose
# MLP up-projections are 512 x 128, decodes 1.2x faster causally and 1.1x with AR-Trust with them unpacked,
# A-B-A-B). bf16 weights are packed at any size (F.linear reorders them at every call).
FP32_MIN_NUMEL = 131_072


def pack_linears(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decoding runs a model's linears on weights prepacked for oneDNN (``flare.model.packed_linear``):
    fp32 on any CPU (the linears large enough to gain), bf16 on a CPU that computes it natively, unless
    ``$FLARE_PACKED_LINEARS`` is 0."""
    return (os.environ.get(PACKED_LINEARS_ENV, "1") != "0" and device.type == "cpu"
            and (dtype == torch.float32 or (dtype == torch.bfloat16 and native_bf16(device)))
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


# Below this many parameters a CPU decode step is op dispatch, not arithmetic, and bf16 only adds casts. Measured
# on an AMX Xeon, 2 threads, causal decode step bf16 / fp32: 1.3-1.5x (0.7M and 1.5M-parameter hybrids, batch 1
# and 8); SmolLM2-135M 1.04x at batch 1 and 0.57x at batch 8; a 0.75B Qwen3.5 shape ~0.5x.
CPU_BF16_MIN_PARAMS = 32_000_000


def pick_dtype(device: torch.device, requested: str | torch.dtype | None, stored: torch.dtype,
               params: int | None = None) -> torch.dtype:
    """The dtype to decode in: the one asked for (or ``$FLARE_DTYPE``), else bf16 where it is native
    (``native_bf16``) and pays (on a CPU, for models of at least ``CPU_BF16_MIN_PARAMS`` ``params``; unknown
    sizes count as large), else the checkpoint's stored dtype. Norms, softmax, recurrent state and attention
    accumulate in fp32 either way."""
    if requested is None:
        requested = os.environ.get(DTYPE_ENV, "auto")
    if requested == "auto":
        small = device.type == "cpu" and params is not None and params < CPU_BF16_MIN_PARAMS
        return torch.bfloat16 if native_bf16(device) and not small else stored
    if requested == "stored":
        return stored
    if isinstance(requested, torch.dtype):
        return requested
    dtype = getattr(torch, str(requested), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {requested!r}: use auto, stored, float32, bfloat16 or float16")
    return dtype


def packs(w: torch.Tensor) -> bool:
    """Whether a linear with weight ``w`` runs on a packed copy when decoding (``flare.model.packed_linear``)."""
    if w.device.type != "cpu":
        return False
    if w.dtype == torch.float32:
        return w.numel() >= FP32_MIN_NUMEL
    return w.dtype == torch.bfloat16 and native_bf16(w.device)


def column_major(w: torch.Tensor) -> bool:
    """Whether a linear with weight ``w`` runs on a column-major copy of it when decoding: fp32 on the CPU, too
    small to pack (``flare.model.packed_linear``)."""
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.numel() < FP32_MIN_NUMEL


def describe(device: torch.device, dtype: torch.dtype, model: torch.nn.Module | None = None) -> str:
    """``cpu (amx) bfloat16, packed linears``: what benchmark headers, ``--json`` and ``/metrics`` print (the
    last part where decoding runs the linears on oneDNN-packed weights, ``pack_linears``; in fp32, with
    ``model`` given, only when one of its linears is large enough, ``FP32_MIN_NUMEL``, and ``column-major
    linears`` when they are all smaller, ``column_major``)."""
    where = f"cpu ({cpu_path()})" if device.type == "cpu" else str(device)
    weights = [] if model is None else [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    path = ""
    if pack_linears(device, dtype):
        if model is None or any(packs(w) for w in weights):
            path = ", packed linears"
        elif any(column_major(w) for w in weights):
            path = ", column-major linears"
    return f"{where} {str(dtype).removeprefix('torch.')}{path}"
