"""Block-wise masking noise (method §2): per-block rates, antithetic across the batch, complementary views."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flare.data.batch import PackedBatch


@dataclass
class NoisyViews:
    xt: torch.Tensor  # [B, V, L] noisy inputs ([MASK] where masked)
    masked: torch.Tensor  # [B, V, L] bool
    rates: torch.Tensor  # [B, nb] the block rates t of the first view


def antithetic_rates(n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """n rates in (0, 1), one per stratum: t_j = (u_j + j) / n, shuffled. Lower variance than iid U(0, 1)."""
    u = torch.rand(n, generator=generator)
    t = (u + torch.arange(n)) / n
    return t[torch.randperm(n, generator=generator)].to(device)


def sample_views(
    batch: PackedBatch,
    block_size: int,
    mask_token_id: int,
    *,
    complementary: bool = True,
    generator: torch.Generator | None = None,
) -> NoisyViews:
    """Mask each supervised position iid with its block's rate t (prompt, template and padding positions never).

    With ``complementary`` a second view masks exactly the supervised positions the first one left visible, so
    every supervised position is masked in exactly one view.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    B, L = batch.input_ids.shape
    nb = -(-L // block_size)
    device = batch.input_ids.device
    rates = antithetic_rates(B * nb, generator, device).view(B, nb)
    per_pos = rates.repeat_interleave(block_size, dim=1)[:, :L]
    draw = torch.rand(B, L, generator=generator).to(device)
    first = (draw < per_pos) & batch.loss_mask
    views = [first, batch.loss_mask & ~first] if complementary else [first]
    masked = torch.stack(views, dim=1)
    x = batch.input_ids[:, None].expand(B, len(views), L)
    xt = torch.where(masked, torch.full_like(x, mask_token_id), x)
    return NoisyViews(xt, masked, rates)
