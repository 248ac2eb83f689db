"""`flare train --dry-run`: the memory a training config needs and the tokens it trains on, before allocating.

One training step of the config (forward, backward, gradient clipping, AdamW step) is replayed on fake tensors
(``FakeTensorMode``: shapes and dtypes, no storage) under torch's ``MemTracker``, which sorts every tensor alive at
the step's peak into parameters, gradients, optimizer state, activations and temporaries. The replay runs the
real training code (the objective's two-stream forward, the chunked loss, checkpointed layers, fp32 masters,
bf16 autocast) on a batch of the config's shape whose rows are each one fully supervised document, the
heaviest case. Only the forward's context (positions, masks) is built for real, as training builds it; its
bytes are counted too, and so is what this process already holds (Python, torch) before the model exists.
The second step is the one measured: the first creates the optimizer state.
"""

from __future__ import annotations

import copy
import resource
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from flare.checkpoint import parameter_count, stored_dtype
from flare.config import ModelConfig
from flare.data.batch import PackedBatch
from flare.model import FlareModel
from flare.objective import FlareObjective
from flare.ops.linear_ce import CHUNK_BYTES
from flare.train.config import TrainConfig
from flare.train.loop import backward, make_optimizer, optimizer_step

GIB = 2**30


@dataclass
class MemoryEstimate:
    """Bytes per process at one training step's peak, by kind; ``without_checkpointing`` is the activations'
    share with every layer's activations kept (None when checkpointing is off anyway)."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int  # the rest of the peak: activations and temporaries, including one logits chunk
    logits_chunk: int  # one chunk of the loss's fp32 logits (part of ``activations``)
    context: int  # positions, masks and segments of the forward, built for real
    runtime: int  # what the process holds before the model: Python, torch, the data pipeline's imports
    checkpointing: bool
    without_checkpointing: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.context + self.runtime

    def table(self) -> str:
        rows = [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer state (AdamW)", self.optimizer),
            (f"activations, temporaries ({'checkpointed layers' if self.checkpointing else 'every layer kept'})",
             self.activations),
            ("  of which one logits chunk", self.logits_chunk),
            ("forward context (masks, positions)", self.context),
            ("runtime (Python, torch)", self.runtime),
            ("peak", self.peak),
        ]
        if self.without_checkpointing is not None:
            rows.append(("peak without checkpointing",
                         self.peak - self.activations + self.without_checkpointing))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"  {name:<{width}}  {value / GIB:8.2f} GiB" for name, value in rows)


def synthetic_batch(cfg: TrainConfig, vocab_size: int, mask_token_id: int | None) -> PackedBatch:
    """``batch_size`` rows of ``seq_len`` tokens, each one document supervised throughout (the [MASK] id never
    appears in it)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    high = vocab_size - 1 if mask_token_id == vocab_size - 1 else vocab_size
    ids = torch.randint(0, high, (cfg.batch_size, cfg.data.seq_len), generator=gen)
    if mask_token_id is not None and mask_token_id < high:
        ids[ids == mask_token_id] = (mask_token_id + 1) % high
    return PackedBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids))


def _tensor_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of the distinct storages reachable from ``obj`` (dataclasses, containers, tensors)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen or obj.device.type == "meta":
            return 0
        seen.add(ptr)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_tensor_bytes(getattr(obj, name), seen) for name in obj.__dataclass_fields__)
    return 0


def resident_bytes(peak: bool = False) -> int:
    """This process's resident set now (or its high-water mark), from /proc where there is one. (``ru_maxrss``
    is the fallback: on Linux it carries the parent's peak across fork and exec, so a child would report its
    launcher's memory.)"""
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _replay(cfg: TrainConfig, config: ModelConfig, dtype: torch.dtype, checkpointing: bool,
            fake: bool = True) -> tuple[int, int, int, int]:
    """One measured training step on fake tensors: bytes at its peak (all of it, parameters and buffers,
    optimizer state) and the bytes of the forward's real context. ``fake=False`` runs it for real (tests)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
    default = torch.get_default_dtype()
    with mode:
        torch.set_default_dtype(dtype)  # parameters are born in it (a fake tensor's dtype cannot be swapped)
        try:
            model = FlareModel(config).train()
        finally:
            torch.set_default_dtype(default)
        model.gradient_checkpointing = checkpointing
        optimizer = make_optimizer(model, cfg)
    objective = FlareObjective(cfg.objective, config.mask_token_id)
    batch = synthetic_batch(cfg, config.vocab_size, config.mask_token_id)
    views = objective.views(batch, row_seeds=list(range(cfg.batch_size)))
    prepared = objective.prepare(model, batch, views)  # real tensors, as in training

    def step() -> None:
        backward(model, objective, batch, views, cfg, prepared=prepared)
        optimizer_step(model, optimizer, cfg)

    with mode:
        step()
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with mode, tracker:
        step()
    peak = {str(k).split(".")[-1].upper(): v for k, v in next(iter(tracker.get_tracker_snapshot("peak").values())).items()}
    return peak["TOTAL"], peak["PARAM"] + peak["BUFFER"], peak["OPT"], _tensor_bytes(prepared)


def _truncated(config: ModelConfig, layers: int) -> ModelConfig:
    out = copy.copy(config)
    out.num_hidden_layers, out.layer_types = layers, list(config.layer_types[:layers])
    return out


def _replay_layers(cfg: TrainConfig, config: ModelConfig, dtype: torch.dtype,
                   checkpointing: bool) -> tuple[int, ...]:
    """``_replay`` of a deep model from its first one and two periods of layers (a period: the layer kinds'
    repeating pattern), extrapolated in the layer count: every byte count grows by the same amount per period
    (parameters, their optimizer state, each layer's saved activations), so this is exact for whole periods and
    keeps the replay of a 48-layer model as fast as a 2-period one."""
    n = config.num_hidden_layers
    period = next((p for p in range(1, n + 1) if n % p == 0
                   and config.layer_types == config.layer_types[:p] * (n // p)), n)
    if n // period <= 2:
        return _replay(cfg, config, dtype, checkpointing)
    one = _replay(cfg, _truncated(config, period), dtype, checkpointing)
    two = _replay(cfg, _truncated(config, 2 * period), dtype, checkpointing)
    periods = n // period
    return tuple(a + (b - a) * (periods - 1) for a, b in zip(one, two))


def estimate(cfg: TrainConfig, *, compare_checkpointing: bool = True) -> MemoryEstimate:
    """The memory one process of ``cfg`` needs at a step's peak (see the module docstring)."""
    runtime = resident_bytes()
    config = ModelConfig.from_file(cfg.model)
    if cfg.objective.kind != "ar" and config.mask_token_id is None:
        raise ValueError(f"the {cfg.objective.kind} objective needs a FLARE checkpoint (run `flare convert` first)")
    source = stored_dtype(cfg.model)
    dtype = torch.float32 if cfg.fp32_master else source
    total, parameters, optimizer, context = _replay_layers(cfg, config, dtype, cfg.checkpointing)
    # Every parameter gets a gradient of its own dtype, alive from the backward to the optimizer step; the
    # tracker files gradients it sees being made as temporaries, so they are counted here and taken from the rest.
    gradients = parameters
    without = None
    if cfg.checkpointing and compare_checkpointing:
        without = _replay_layers(cfg, config, dtype, False)[0] - parameters - optimizer - gradients
    notes = [f"parameters {dtype} (stored {source}); compute {'bf16 autocast' if cfg.bf16 else str(dtype)}"]
    return MemoryEstimate(
        parameters=parameters, gradients=gradients, optimizer=optimizer,
        activations=max(0, total - parameters - optimizer - gradients), logits_chunk=CHUNK_BYTES,
        context=context, runtime=runtime, checkpointing=cfg.checkpointing, without_checkpointing=without,
        notes=notes,
    )


def token_budget(cfg: TrainConfig, world: int = 1) -> str:
    per_step = cfg.batch_size * cfg.grad_accum * world * cfg.data.seq_len
    return (f"tokens: {cfg.data.seq_len:,} per row, {per_step:,} per step ({cfg.batch_size} rows x {cfg.grad_accum} "
            f"micro-batches x {world} ranks), {per_step * cfg.steps:,} over {cfg.steps:,} steps "
            f"(row positions, supervised or not)")


def report(cfg: TrainConfig, world: int = 1) -> str:
    est = estimate(cfg)
    params = parameter_count(cfg.model)
    lines = [f"dry run: {cfg.model}: {params / 1e6:,.1f}M parameters, {cfg.objective.kind} objective, "
             f"{cfg.batch_size} x {cfg.data.seq_len} tokens per micro-batch ({cfg.row_tokens:,} per forward row)",
             *(f"  {n}" for n in est.notes),
             "memory of one process at a step's peak:",
             est.table()]
    if world > 1:
        sharded = (est.parameters + est.gradients + est.optimizer) // world
        lines.append(f"  under FSDP2 over {world} ranks, parameters, gradients and optimizer state are sharded: "
                     f"about {(est.peak - est.parameters - est.gradients - est.optimizer + sharded) / GIB:.2f} "
                     f"GiB per rank")
    lines.append(token_budget(cfg, world))
    return "\n".join(lines)
