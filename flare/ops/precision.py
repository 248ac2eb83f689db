"""The accumulation dtype of the numerically sensitive ops (norms, decays, recurrences)."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, TypeVar

import torch

_Fn = TypeVar("_Fn", bound=Callable)

# Whether this process treats denormal floats as zero (set by flare.device.flush_denormals): ops that would
# otherwise zero tiny values themselves, to keep them from turning denormal, skip that work.
DENORMALS_FLUSHED = [False]

# Decay exponents are clamped to this before e^x: below about -87.3 an fp32 exp lands under the smallest normal
# float and takes the x86 slow path, flushed or not (0.5M values: 8.1 ms at -88 against 0.05 at -87; AMX Xeon,
# 2 threads). e^-80 = 1.8e-35, where the exact value would be smaller still or flushed to zero: nothing a sum of
# decayed O(1) terms resolves.
EXP_FLOOR = -80.0


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every training/serving dtype; fp64 stays fp64, so a float64 model is float64 end to end and
    exactness tests can separate logic errors from round-off."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` without the dispatch when nothing changes (decode steps are priced in dispatches)."""
    return x if x.dtype == dtype else x.to(dtype)


def _first_device_type(args: tuple, kwargs: dict) -> str | None:
    """The device type of the first tensor among the arguments (or the first field of a tuple argument: a
    NamedTuple of tensors, for a method)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, tuple) and a:
            a = a[0]
        if isinstance(a, torch.Tensor):
            return a.device.type
    return None


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is enabled for this device type (False for one autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know (meta) / an old signature
        return False


def autocast_off(device_type: str):
    """A context with autocast off on this device type (a no-op context where it is off already)."""
    return torch.autocast(device_type, enabled=False) if autocast_on(device_type) else contextlib.nullcontext()


def no_autocast(fn: _Fn) -> _Fn:
    """Run ``fn`` (a recurrence core) with autocast off on its tensors' device.

    Under ``torch.autocast(dtype=bfloat16)`` every matmul would otherwise be recast to bf16 even though the core
    casts its operands to :func:`accum_dtype` first: the chunked recurrence then drifts by ~0.5% of its output
    at T = 256-4,096. With autocast off the core's own casts decide, so it runs in fp32 (fp64 for fp64 inputs)
    whatever the caller's autocast state, and returns its outputs in the dtypes its contract names (o in v's
    dtype). The projections around the core stay under the caller's autocast. Autograd's backward of the ops
    recorded here runs in the same fp32. Without autocast the call costs one C-level check (decode steps are
    priced in dispatches, and this is none)."""

    @functools.wraps(fn)
    def core(*args, **kwargs):
        if _any_autocast is not None and not _any_autocast():
            return fn(*args, **kwargs)
        device_type = _first_device_type(args, kwargs)
        if device_type is None:
            return fn(*args, **kwargs)
        with autocast_off(device_type):
            return fn(*args, **kwargs)

    return core  # type: ignore[return-value]


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def faking() -> bool:
    """Whether tensors made now are fake: a ``FakeTensorMode`` is active (``flare train --dry-run``), or
    ``torch.compile`` is tracing. What a module-level cache must neither keep nor hand out (a fake tensor would
    outlive the dry run), and what a traced graph must not look up by identity or data pointer (dynamo breaks the
    graph there; the value is made in the graph instead)."""
    return torch.compiler.is_compiling() or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def constant(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A kept 0-d tensor of ``value``: multiplying by it is a plain tensor op, where a Python float is first
    wrapped into a new tensor on every call (three times the cost of the op itself on a small CPU tensor)."""
    if faking():
        return torch.tensor(value, dtype=dtype, device=device)
    key = (value, dtype, device)
    t = _CONSTANTS.get(key)
    if t is None:
        with torch.inference_mode(False):  # kept for training too, whose autograd refuses inference tensors
            t = _CONSTANTS.setdefault(key, torch.tensor(value, dtype=dtype, device=device))
    return t


def logit_tolerance(logits: torch.Tensor, ulps: int = 4) -> torch.Tensor:
    """How far two computations of the same logits may differ per row [...]: in a 16-bit dtype a verify row and
    a causal step run different GEMM shapes, which round differently, so they agree to a few units in the last
    place of the row's largest |logit| (``ulps`` of them); fp32 and fp64 to a relative 1e-4 and 1e-10. Two tokens
    whose logits are closer than this are a near-tie: greedy decoding may pick either, exactly or not."""
    finite = logits.detach().float()
    finite = finite.masked_fill(~torch.isfinite(finite), 0.0)  # the [MASK] row's -inf
    big = finite.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny)
    if logits.dtype in (torch.bfloat16, torch.float16):
        mantissa = 7 if logits.dtype == torch.bfloat16 else 10
        return ulps * torch.exp2(torch.floor(torch.log2(big)) - mantissa)
    return big * (1e-10 if logits.dtype == torch.float64 else 1e-4)


def near_tie(logits: torch.Tensor, slack: float = 2.0) -> bool:
    """Whether the two largest of these logits [V] are within ``slack`` tolerances of each other: a place where
    greedy decodings computed with different shapes may pick different tokens (the slack covers a third
    computation, e.g. a full forward used to check two others)."""
    top2 = logits.detach().float().topk(2).values
    return float(top2[0] - top2[1]) <= slack * float(logit_tolerance(logits))
