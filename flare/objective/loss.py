"""The token-equal loss (method §2): L = L_diff + w * L_AR over the two-stream forward.

- L_AR: clean row i predicts x_{i+1} (targets across a document boundary, or not supervised, are dropped).
- L_diff: a masked noisy row i predicts x_{i+1} (logit shift); unmasked noisy rows are not supervised.
Both are per-token means, so every supervised target gets one AR and (over the complementary views) one
diffusion term. Logits are computed only for the rows that have a target, a chunk of rows at a time
(``flare.ops.linear_ce``), so the full [rows, vocab] logits are never held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flare.config import DEFAULT_BLOCK_SIZE
from flare.data.batch import PackedBatch
from flare.model import FlareModel
from flare.model.context import ForwardContext, Packed, use_flex
from flare.model.noisy_blocks import NoisyBlocks
from flare.objective.noise import NoisyViews, sample_views
from flare.ops.linear_ce import linear_cross_entropy_sums

KINDS = ("flare", "block_diffusion", "ar")


@dataclass
class ObjectiveConfig:
    # flare: token-causal clean stream with its AR loss; block_diffusion: block-causal clean stream, no AR loss
    # (the pure block-diffusion ablation); ar: plain AR fine-tuning (the cheap proxy for screening data).
    kind: str = "flare"
    # Recorded in the trained checkpoint (flare.block_size); decoding modes size their MASK rows from it.
    block_size: int = DEFAULT_BLOCK_SIZE
    ar_loss_weight: float = 1.0
    complementary: bool = True
    # Compute the clean stream once for both complementary views ([x0; xt1; xt2], 3L rows) instead of doubling
    # the batch ([x0; xt1], [x0; xt2], 4L rows). Same loss and gradients, a quarter fewer FLOPs.
    share_clean: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"objective kind must be one of {KINDS}, got {self.kind!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.ar_loss_weight < 0:
            raise ValueError(f"ar_loss_weight must be >= 0, got {self.ar_loss_weight}")


@dataclass
class LossParts:
    """Summed cross-entropies and their token counts; the loss is sum_diff / n_diff + w * sum_ar / n_ar.

    Kept as sums so that a trainer can divide by counts taken over every micro-batch and rank: the loss is then
    the same per-token mean however the global batch is split.
    """

    sum_diff: torch.Tensor
    n_diff: int
    sum_ar: torch.Tensor
    n_ar: int
    ar_weight: float
    masked_fraction: float = 0.0

    def loss(self, n_diff: int | None = None, n_ar: int | None = None) -> torch.Tensor:
        n_diff = self.n_diff if n_diff is None else n_diff
        n_ar = self.n_ar if n_ar is None else n_ar
        diff = self.sum_diff / max(n_diff, 1)
        return diff + self.ar_weight * self.sum_ar / max(n_ar, 1) if self.ar_weight > 0 else diff

    def metrics(self) -> dict[str, float]:
        loss_diff = self.sum_diff.item() / max(self.n_diff, 1)
        loss_ar = self.sum_ar.item() / max(self.n_ar, 1)
        return {
            "loss": loss_diff + self.ar_weight * loss_ar if self.ar_weight > 0 else loss_diff,
            "loss_diff": loss_diff,
            "loss_ar": loss_ar,
            "masked_fraction": self.masked_fraction,
            "diff_tokens": self.n_diff,
            "ar_tokens": self.n_ar,
        }


def _ce_sums(model: FlareModel, *selected: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
    """Summed CE of each (rows [N, E], targets [N]) pair: (sum, N) per pair, a 0 still in the graph for N = 0.

    All pairs go through the head in one chunked pass (``flare.ops.linear_ce``): no [N, V] logits are ever held,
    and the head is cast and read once. Same value and gradients as ``model.logits`` followed by a summed fp32
    cross-entropy per pair."""
    hidden = torch.cat([h for h, _ in selected])
    targets = torch.cat([t for _, t in selected])
    groups = torch.cat([torch.full_like(t, i) for i, (_, t) in enumerate(selected)])
    sums = linear_cross_entropy_sums(hidden, model.lm_head.weight, targets, groups, len(selected),
                                     masked_id=model.config.mask_token_id)
    if hidden.shape[0] == 0:
        sums = sums + hidden.sum() * 0.0  # keep the hidden states in the graph
    return [(sums[i], t.numel()) for i, (_, t) in enumerate(selected)]


@dataclass
class Prepared:
    """A step's host-side preparation (``FlareObjective.prepare``): the forward's rows and context, and the flat
    indices of the scored hidden rows with their targets (clean rows over [B * L], noisy rows over [B * V * L])."""

    input_ids: torch.Tensor
    context: ForwardContext
    ar_rows: torch.Tensor
    ar_targets: torch.Tensor
    diff_rows: torch.Tensor
    diff_targets: torch.Tensor
    masked_fraction: float


class FlareObjective:
    def __init__(self, config: ObjectiveConfig, mask_token_id: int | None) -> None:
        if config.kind != "ar" and mask_token_id is None:
            raise ValueError(f"the {config.kind} objective needs a mask token id (run `flare convert` first)")
        self.config = config
        self.mask_token_id = mask_token_id
        # Run only the noisy blocks some scored row sees (``flare.model.noisy_blocks``): the same losses and
        # gradients as the full layout, which tests compare it with by turning this off.
        self.drop_idle_blocks = True

    def __call__(
        self, model: FlareModel, batch: PackedBatch, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-token mean loss of one batch and its metrics."""
        return self.loss_from_views(model, batch, self.views(batch, generator))

    def views(
        self, batch: PackedBatch, generator: torch.Generator | None = None, row_seeds: list[int] | None = None
    ) -> NoisyViews | None:
        """The noise of one batch (None for the AR objective), drawn before any forward."""
        if self.config.kind == "ar":
            return None
        return sample_views(batch, self.config.block_size, self.mask_token_id,
                            complementary=self.config.complementary, generator=generator, row_seeds=row_seeds)

    def counts(self, batch: PackedBatch, views: NoisyViews | None) -> tuple[int, int]:
        """(diffusion targets, AR targets) of a batch, known without a forward."""
        ok = batch.next_target_ok
        n_diff = 0 if views is None else int((views.masked & ok[:, None]).sum())
        return n_diff, int(ok.sum()) if self.ar_weight > 0 else 0

    @property
    def ar_weight(self) -> float:
        """The weight w of the AR term (1 for plain AR, 0 for the block-diffusion ablation)."""
        return {"ar": 1.0, "block_diffusion": 0.0}.get(self.config.kind, self.config.ar_loss_weight)

    def loss_from_views(
        self, model: FlareModel, batch: PackedBatch, views: NoisyViews | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        parts = self.parts(model, batch, views)
        return parts.loss(), parts.metrics()

    def prepare(self, model: FlareModel, batch: PackedBatch, views: NoisyViews | None) -> Prepared:
        """Everything of a step but its tensors' values: the forward's rows and context, and which hidden rows
        are scored against which targets (host reads happen here, none during the forward and loss)."""
        cfg = self.config
        nxt, ok = _next_tokens(batch.input_ids), batch.next_target_ok
        if views is None:  # plain AR fine-tuning
            ids, layout = batch.input_ids, Packed(batch.doc_ids)
            diff_rows = diff_targets = ok.new_zeros(0, dtype=torch.long)
            fraction = 0.0
        else:
            readout = "block" if cfg.kind == "block_diffusion" else "token"
            B, V, L = views.xt.shape
            scored = views.masked & ok[:, None]
            if cfg.share_clean or V == 1:
                # Only the noisy blocks with a masked row are run (the others are seen by no scored row): on
                # supervised data, where prompts fill most blocks, that is a fraction of the V * L noisy rows.
                # Flex attention (CUDA) keeps the full layout, whose tile masks are built without a dense mask.
                kept = None
                if self.drop_idle_blocks and L % cfg.block_size == 0 and not use_flex(batch.input_ids.device):
                    kept = NoisyBlocks.active(views.masked, cfg.block_size)
                ids, layout = model.two_stream_input(batch.input_ids, views.xt, batch.doc_ids, cfg.block_size,
                                                     readout, kept)
                if kept is not None:
                    scored = kept.select(scored) & kept.real
            else:
                # The batch-doubling formulation: each view in its own row with its own copy of the clean stream.
                kept = None
                ids, layout = model.two_stream_input(batch.input_ids.repeat_interleave(V, dim=0),
                                                     views.xt.reshape(B * V, 1, L),
                                                     batch.doc_ids.repeat_interleave(V, dim=0), cfg.block_size,
                                                     readout)
            diff_rows = scored.flatten().nonzero().squeeze(1)
            targets = nxt[:, None].expand(B, V, L)
            diff_targets = (targets if kept is None else kept.select(targets)).flatten()[diff_rows]
            maskable = int(batch.loss_mask.sum()) * V
            fraction = int(views.masked.sum()) / maskable if maskable else 0.0
        if self.ar_weight > 0:
            ar_rows = ok.flatten().nonzero().squeeze(1)
            ar_targets = nxt.flatten()[ar_rows]
        else:
            ar_rows = ar_targets = ok.new_zeros(0, dtype=torch.long)
        return Prepared(ids, model.context(ids, layout=layout), ar_rows, ar_targets, diff_rows, diff_targets,
                        fraction)

    def parts(self, model: FlareModel, batch: PackedBatch, views: NoisyViews | None,
              prepared: Prepared | None = None) -> LossParts:
        """The summed losses of one batch; ``prepared`` is ``prepare``'s result for the same arguments."""
        p = prepared or self.prepare(model, batch, views)
        h = model.hidden_states(p.input_ids, context=p.context)
        E = h.shape[-1]
        if views is None:
            clean, noisy = h, None
        else:
            B, V, L = views.xt.shape
            if self.config.share_clean or V == 1:
                clean, noisy = h[:, :L], h[:, L:]
            else:
                # Every copy of the clean stream is the same function of x0: averaging them keeps the AR mean.
                h2 = h.view(B, V, 2 * L, E)
                clean, noisy = h2[:, :, :L].mean(1), h2[:, :, L:]
        w = self.ar_weight
        ar = (clean.reshape(-1, E).index_select(0, p.ar_rows), p.ar_targets)
        if noisy is None:
            ((sum_ar, n_ar),) = _ce_sums(model, ar)
            return LossParts(h.sum() * 0.0, 0, sum_ar, n_ar, w)
        diff = (noisy.reshape(-1, E).index_select(0, p.diff_rows), p.diff_targets)
        (sum_diff, n_diff), (sum_ar, n_ar) = _ce_sums(model, diff, ar)
        return LossParts(sum_diff, n_diff, sum_ar, n_ar, w, p.masked_fraction)


def _next_tokens(ids: torch.Tensor) -> torch.Tensor:
    """[B, L]: token i+1 at position i (the last position gets a dummy 0; it never has a valid target)."""
    return torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
