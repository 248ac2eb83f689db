"""Data parallelism through torchrun and FSDP2 (``fully_shard``): process-group set-up, sharding, reductions.

No home-made communication: collectives are torch.distributed's, and gradient averaging is FSDP's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Dist:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        rank = dist.get_rank()
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return Dist(rank, world, torch.device("cuda", local))
        return Dist(rank, world, torch.device("cpu"))
    return Dist(0, 1, torch.device("cuda" if use_cuda else (device if device != "auto" else "cpu")))


def shard(model: torch.nn.Module, d: Dist, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2 over the data-parallel group: each decoder layer, then the root (embeddings, norm, head).

    FSDP only all-gathers the root's parameters around ``forward``, but training never calls it: the objective
    calls ``hidden_states`` (directly, or through ``two_stream_hidden``) and then ``logits``. So
    ``hidden_states`` is registered as a forward method. The root keeps its parameters unsharded after forward
    (FSDP2 never reshards the root then), so ``logits`` right after it sees the full head, and its gradient is
    reduce-scattered with the rest of the root's at the end of backward.

    ``compute_dtype`` (bf16 training): FSDP2's mixed precision gathers parameters in that dtype for the forward
    and backward and reduces gradients in fp32 into the fp32 shards the optimizer steps.
    """
    if d.world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
            if compute_dtype is not None else MixedPrecisionPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        register_fsdp_forward_method(model, "hidden_states")
    return model


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Sum a few scalars over ranks (token counts, loss sums for logging)."""
    if d.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
