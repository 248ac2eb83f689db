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
    u = torch.rand(n, generator=generator)  # host: noise comes from a CPU generator, the same on every device
    t = (u + torch.arange(n)) / n  # host: as u
    return t[torch.randperm(n, generator=generator)].to(device)


def sample_views(
    batch: PackedBatch,
    block_size: int,
    mask_token_id: int,
    *,
    complementary: bool = True,
    generator: torch.Generator | None = None,
    row_seeds: list[int] | None = None,
) -> NoisyViews:
    """Mask each supervised position iid with its block's rate t (prompt, template and padding positions never).

    With ``complementary`` a second view masks exactly the supervised positions the first one left visible, so
    every supervised position is masked in exactly one view. Rates are stratified over all blocks of the batch
    (``generator``), or, with ``row_seeds``, over the blocks of each row from that row's own seed: a row then
    gets the same noise whichever rank or micro-batch it lands in, so a run's losses do not depend on how the
    global batch is split.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    B, L = batch.input_ids.shape
    nb = -(-L // block_size)
    device = batch.input_ids.device
    if row_seeds is None:
        rates = antithetic_rates(B * nb, generator, device).view(B, nb)
        draw = torch.rand(B, L, generator=generator).to(device)  # host: CPU generator, as in antithetic_rates
    else:
        if len(row_seeds) != B:
            raise ValueError(f"row_seeds has {len(row_seeds)} entries for {B} rows")
        gens = [torch.Generator().manual_seed(int(s)) for s in row_seeds]
        rates = torch.stack([antithetic_rates(nb, g, device) for g in gens])
        draw = torch.stack([torch.rand(L, generator=g) for g in gens]).to(device)  # host: per-row CPU generators
    per_pos = rates.repeat_interleave(block_size, dim=1)[:, :L]
    first = (draw < per_pos) & batch.loss_mask
    views = [first, batch.loss_mask & ~first] if complementary else [first]
    masked = torch.stack(views, dim=1)
    x = batch.input_ids[:, None].expand(B, len(views), L)
    xt = torch.where(masked, torch.full_like(x, mask_token_id), x)
    return NoisyViews(xt, masked, rates)
