"""Optional fused backend: flash-linear-attention's chunked gated delta kernel (Triton; CUDA only).

What it serves: the causal form of long sequences, i.e. the ``"chunk"`` choice of
:func:`flare.ops.gated_delta.gated_delta` (prefill, the causal and packed training layouts, a decode loop's
prompt), when the inputs are on a CUDA device, the ``fla`` package is installed, the values are 16-bit (a bf16 /
fp16 model, or v from projections under bf16 autocast) and ``FLARE_GDN_BACKEND`` is not ``torch``. Everything
else, and every CPU run, stays on the pure-torch forms, which remain the reference.

What it does not serve, and why:

* the two-stream training layout. Its noisy blocks are seeded by the clean state at every block start (every
  ``block_size`` positions); the torch op reads those from its chunk-start states and per-chunk deltas. fla's
  kernel keeps its per-chunk states inside (chunks of 64, not aligned to the block size) and returns only the
  outputs and the final state, so the seeds cannot be derived from it without a per-block pass of their own;
  two_stream runs in torch.
* inference rows (closed form over a few rows, prefix states for commits), decode steps and short runs
  (T <= 16): fla has nothing that beats them or returns what they keep.
* fp32 values: fla's kernels take 16-bit operands (older releases refuse fp32 outright); a fp32 model keeps the
  fp32 torch path.
* differentiable inputs where fla's backward does not run: some releases refuse it on some GPU / Triton pairs
  (fla 0.6.0 under Triton 3.6 on an H200 raises in ``chunk_bwd_dqkwg``, a known miscompile of those Triton
  versions on Hopper). :func:`backward_works` probes it once per device with a small forward and backward; where it
  fails, a training forward takes the torch chunk form (one warning) and inference keeps fla.

Conventions mapped (checked against fla's ``chunk_gated_delta_rule``):

* layout ``[B, T, H, D]`` (not head-first) for q, k, v and ``[B, T, H]`` for g and beta, like ours;
* g is the per-step log decay (fla cumulates it per chunk itself), beta the write strength: the same recurrence
  ``S_t = e^{g_t} S_{t-1} + beta_t k_t (v_t - e^{g_t} S_{t-1}^T k_t)^T``, ``o_t = scale S_t^T q_t``;
* state ``[N, H, Dk, Dv]`` (key dim first), as ours; initial and final states in fp32;
* ``scale`` defaults to ``Dk ** -0.5`` in both (passed explicitly anyway);
* grouped heads (H % Hk): q/k heads are repeated to H here (value head h reads q/k head h // (H / Hk), our
  convention), since not every fla release takes fewer q/k heads than value heads;
* packed documents: ``cu_seqlens`` [N + 1] with batch 1, one initial/final state per document;
* q, k, v and beta are cast to v's 16-bit dtype, g stays fp32, as fla's own tests feed the kernel.

Precision: the kernel multiplies 16-bit operands with fp32 accumulation, so it agrees with the fp32 torch path to
about 1e-2 relative, not the torch path's ~1e-6 (``FLARE_GDN_BACKEND=torch`` forces the torch path). ``fla`` is
imported on first use only, never at import of this module.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import warnings

import torch

from flare.ops.gated_delta.naive import expand_heads, validate_inputs
from flare.ops.precision import no_autocast

__all__ = ["ENV", "available", "backend_setting", "backward_works", "gated_delta_fla", "installed", "selected"]

ENV = "FLARE_GDN_BACKEND"
SETTINGS = ("auto", "torch")
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256  # fla's chunk kernels keep a head's K (and V) in one tile


@functools.lru_cache(maxsize=1)
def installed() -> bool:
    """Whether the ``fla`` package can be imported (looked up once, without importing it)."""
    return importlib.util.find_spec("fla") is not None


def available(device: torch.device | str) -> bool:
    """Whether the fused kernel can run on ``device``: a CUDA device and the ``fla`` package installed."""
    return torch.device(device).type == "cuda" and installed()


def backend_setting() -> str:
    """``FLARE_GDN_BACKEND``: ``auto`` (default: fla where it applies) or ``torch`` (never fla)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in SETTINGS:
        raise ValueError(f"{ENV} must be one of {SETTINGS}, got {value!r}")
    return value


def selected(q: torch.Tensor, v: torch.Tensor, needs_grad: bool = False) -> bool:
    """Whether :func:`flare.ops.gated_delta.gated_delta` runs its chunk choice on fla for these inputs: CUDA with
    fla installed, 16-bit values, head dims the kernel takes, ``FLARE_GDN_BACKEND`` not ``torch``, and, for
    inputs a backward will go through (``needs_grad``), a backward that runs on this device."""
    return (
        v.dtype in KERNEL_DTYPES
        and q.shape[-1] <= MAX_HEAD_DIM
        and v.shape[-1] <= MAX_HEAD_DIM
        and available(v.device)
        and backend_setting() != "torch"
        and (not needs_grad or backward_works(str(v.device)))
    )


@functools.lru_cache(maxsize=None)
def backward_works(device: str) -> bool:
    """Whether fla's kernel can be differentiated on ``device``: one small forward and backward, probed once per
    device. A failure warns once and answers False (the caller's differentiable forwards take the torch path)."""
    gen = torch.Generator().manual_seed(0)
    shape = (1, 64, 1, 64)  # one head of 64 positions: one chunk of the kernel
    try:
        with torch.enable_grad():
            q, k = (torch.nn.functional.normalize(torch.randn(shape, generator=gen), dim=-1).to(device)  # host: seeded
                    for _ in range(2))
            v = torch.randn(shape, generator=gen).to(device, torch.bfloat16).requires_grad_(True)  # host: seeded
            g = torch.full(shape[:3], -0.1, device=device)
            beta = torch.full(shape[:3], 0.5, device=device)
            o, state = gated_delta_fla(q, k, v, g, beta)
            (o.float().sum() + state.sum()).backward()
        return True
    except Exception as e:  # whatever the release raises (RuntimeError, a Triton compile error, ...)
        warnings.warn(f"flash-linear-attention's backward failed on {device} ({type(e).__name__}: {e}); "
                      f"differentiable gated delta forwards run on the torch chunk form there, inference keeps fla",
                      RuntimeWarning, stacklevel=2)
        return False


@functools.lru_cache(maxsize=1)
def _kernel():
    """fla's ``chunk_gated_delta_rule`` and the keyword arguments that pin our layout on every release."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    extra = {}
    try:
        head_first = inspect.signature(chunk_gated_delta_rule).parameters.get("head_first")
    except (TypeError, ValueError):
        head_first = None
    if head_first is not None and head_first.default is not False:
        extra["head_first"] = False  # releases whose default was the head-first layout
    return chunk_gated_delta_rule, extra


@no_autocast
def gated_delta_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule on fla's fused chunk kernel, with :func:`~flare.ops.gated_delta.gated_delta_chunk`'s
    contract (differentiable through q, k, v, g, beta and the initial state).

    Args:
        q, k: ``[B, T, Hk, Dk]``, ``H % Hk == 0``, already L2-normalised.
        v: ``[B, T, H, Dv]``; its dtype is the kernel's when 16-bit, else the kernel runs in bf16.
        g, beta: ``[B, T, H]`` log decay and write strength.
        initial_state: ``[B, H, Dk, Dv]`` (``[N, H, Dk, Dv]`` with ``cu_seqlens``) or ``None`` (zeros).
        scale: defaults to ``Dk ** -0.5``.
        cu_seqlens: ``[N + 1]`` document boundaries of a packed batch of one row (B must be 1), or ``None``.

    Returns:
        ``o [B, T, H, Dv]`` in v's dtype and ``final_state [B or N, H, Dk, Dv]`` in fp32.
    """
    B, T, H, Dk, Dv = validate_inputs(q, k, v, g, beta, None)
    n_states = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens packs documents into one row: batch must be 1, got {B}")
        if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be [N + 1] boundaries, got shape {tuple(cu_seqlens.shape)}")
        n_states = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (n_states, H, Dk, Dv):
        raise ValueError(f"initial_state must have shape {(n_states, H, Dk, Dv)}, got {tuple(initial_state.shape)}")
    if scale is None:
        scale = Dk**-0.5
    dev = v.device
    s0 = None if initial_state is None else initial_state.to(device=dev, dtype=torch.float32)
    if T == 0:
        state = torch.zeros(n_states, H, Dk, Dv, dtype=torch.float32, device=dev) if s0 is None else s0.clone()
        return torch.zeros(B, 0, H, Dv, dtype=v.dtype, device=dev), state

    kd = v.dtype if v.dtype in KERNEL_DTYPES else torch.bfloat16
    q, k = (expand_heads(x, H).to(kd) for x in (q, k))
    kernel, extra = _kernel()
    if cu_seqlens is not None:
        extra = {**extra, "cu_seqlens": cu_seqlens.to(device=dev, dtype=torch.long)}
    with warnings.catch_warnings():
        # Some releases warn whenever T < H, taking it for a head-first layout; ours is never head-first.
        warnings.filterwarnings("ignore", message=".*head.first.*")
        warnings.filterwarnings("ignore", message=".*format mismatch.*")
        o, state = kernel(q, k, v.to(kd), g.to(torch.float32), beta.to(kd), scale=float(scale), initial_state=s0,
                          output_final_state=True, **extra)
    return o.to(v.dtype), state.to(torch.float32)
