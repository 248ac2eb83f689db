"""The training loop: one loop for every objective (ar, flare, block_diffusion), single process or torchrun.

Each step draws ``grad_accum`` micro-batches per rank and their noise up front, so the loss can be normalised by
the token counts of the whole global batch: the per-token mean is then the same however the batch is split over
ranks and micro-batches. Noise is seeded per (step, global row), so a resumed run, or a run on
another number of ranks, sees exactly the same noise.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from flare.checkpoint import load_model
from flare.data import ChatTokenizer, PackedBatch, PackedDataset, Sampler
from flare.objective import FlareObjective, LossParts
from flare.train import checkpointing
from flare.train.config import TrainConfig, to_dict
from flare.train.distributed import all_sum, setup, shard, teardown

METRICS_FILE = "metrics.jsonl"
# Counters of PackedDataset.stats that describe what was kept; every other counter is a reason rows were dropped.
_KEPT_STATS = frozenset({"lines", "conversations", "documents", "rows", "tokens", "supervised_tokens", "pad_tokens",
                         "truncated", "truncated_tokens"})


def data_summary(name: str, stats: Counter) -> str:
    """One line per source: what was read, kept and dropped (by reason)."""
    dropped = {k: v for k, v in sorted(stats.items()) if k not in _KEPT_STATS and v}
    reasons = ", ".join(f"{k} {v}" for k, v in dropped.items())
    return (f"data {name}: {stats['lines']} lines, {stats['documents']} documents, {stats['rows']} rows "
            f"({stats['supervised_tokens']} supervised tokens), {sum(dropped.values())} rejected"
            + (f" ({reasons})" if reasons else ""))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio``; ``step`` counts from 0."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, sharded: bool = False) -> torch.optim.Optimizer:
    """AdamW over every parameter; the fused kernel on one device (no per-parameter temporaries: at a 248k
    vocabulary the embedding's alone would be a GB), the default one over FSDP2 shards."""
    o = cfg.optim
    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             weight_decay=o.weight_decay, fused=None if sharded else True)


def backward(model: torch.nn.Module, objective: FlareObjective, batch: PackedBatch, views, cfg: TrainConfig,
             counts: tuple[int, int] | None = None, scale: float = 1.0, prepared=None) -> LossParts:
    """Forward and backward of one micro-batch, the loss normalised by the step's token ``counts`` (the batch's
    own by default) and multiplied by ``scale``; gradients accumulate into the parameters."""
    autocast = torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    with autocast:
        parts = objective.parts(model, batch, views, prepared)
        loss = parts.loss(*(counts or (parts.n_diff, parts.n_ar))) * scale
    loss.backward()
    return parts


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.Tensor:
    """Clip, step, clear the gradients; returns the gradient norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _row_seed(seed: int, step: int, row: int) -> int:
    return ((seed * 1_000_003 + step) * 65_537 + row) % (2**62)


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        if not cfg.model:
            raise ValueError("model is required: the checkpoint directory to train from")
        if not cfg.data.train:
            raise ValueError("data.train is empty: give at least one JSONL source")
        self.cfg = cfg
        self.d = setup(cfg.device)
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.out_dir)
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")

        model = load_model(cfg.model, device=self.d.device)
        # Checkpoints keep the dtype the model came in (what Hugging Face tools expect of it); training keeps an
        # fp32 master copy unless told not to.
        self.stored_dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        if cfg.fp32_master:
            model.float()
        if cfg.objective.kind != "ar":
            # Saved with every checkpoint, so decoders can tell which runs of MASK rows were trained.
            model.config.block_size = cfg.objective.block_size
        model.gradient_checkpointing = cfg.checkpointing
        self.model = shard(model.train(), self.d, compute_dtype=torch.bfloat16 if cfg.bf16 else None)
        self.objective = FlareObjective(cfg.objective, model.config.mask_token_id)
        tokenizer = ChatTokenizer.from_dir(cfg.model)
        bs = cfg.objective.block_size
        sources = {}
        for src in cfg.data.train:
            name = src.name or Path(src.path).stem
            if name in sources:
                # Sources are keyed by name: a second one of the same name would silently replace the first.
                raise ValueError(f"two data.train sources are named {name!r}; give them distinct `name`s")
            sources[name] = PackedDataset.from_jsonl(src.path, tokenizer, seq_len=cfg.data.seq_len, block_size=bs,
                                                     name=name, on_error=cfg.data.on_error, dedup=cfg.data.dedup)
        weights = {src.name or Path(src.path).stem: src.weight for src in cfg.data.train}
        self.sampler = Sampler(sources, cfg.batch_size, weights=weights, seed=cfg.seed, rank=self.d.rank,
                               world_size=self.d.world)
        self.eval_set = None
        if cfg.data.eval:
            self.eval_set = PackedDataset.from_jsonl(cfg.data.eval, tokenizer, seq_len=cfg.data.seq_len,
                                                     block_size=bs, name="eval", on_error=cfg.data.on_error)
        # What each source kept and rejected, said once (a skipped row is otherwise only a logged warning).
        self.data_stats = {name: dict(ds.stats) for name, ds in sources.items()}
        if self.eval_set is not None:
            self.data_stats["eval"] = dict(self.eval_set.stats)
        if self.d.main:
            for name, stats in self.data_stats.items():
                print(data_summary(name, Counter(stats)), file=sys.stderr, flush=True)
        self.optimizer = make_optimizer(self.model, cfg, sharded=self.d.world > 1)
        self.step = 0
        if self.d.main:
            checkpointing.remove_partial(self.out)
        done = checkpointing.checkpoints(self.out)
        if done:
            state = checkpointing.load(done[-1], self.model, self.optimizer)
            self.sampler.load_state_dict(state["sampler"])
            self.step = int(state["step"])
            if self.d.main:
                self._truncate_log()

    # --------------------------------------------------------------------------------------------- one step
    def train_step(self) -> dict[str, float]:
        cfg, d = self.cfg, self.d
        micro = [next(self.sampler).to(d.device) for _ in range(cfg.grad_accum)]
        views = []
        for m, batch in enumerate(micro):
            # The row's index in the step's global stream (micro-batch, rank, row): the same row gets the same
            # noise whether it arrives as one batch of 4 or as two micro-batches of 2, on one rank or two.
            first = (m * d.world + d.rank) * cfg.batch_size
            seeds = [_row_seed(cfg.seed, self.step, first + i) for i in range(len(batch.input_ids))]
            views.append(self.objective.views(batch, row_seeds=seeds))
        counts = [self.objective.counts(b, v) for b, v in zip(micro, views)]
        n_diff, n_ar = all_sum([sum(c[0] for c in counts), sum(c[1] for c in counts)], d)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(self.step, cfg)
        sums = [0.0, 0.0]
        for batch, v in zip(micro, views):
            # FSDP averages gradients over ranks; scaling by the world size makes the result the gradient of the
            # global per-token mean.
            parts = backward(self.model, self.objective, batch, v, cfg, (int(n_diff), int(n_ar)), d.world)
            sums[0] += parts.sum_diff.item()
            sums[1] += parts.sum_ar.item()
        grad_norm = optimizer_step(self.model, self.optimizer, cfg)
        sum_diff, sum_ar = all_sum(sums, d)
        totals = self._totals(sum_diff, n_diff, sum_ar, n_ar)
        tokens = int(all_sum([sum(int(b.loss_mask.sum()) for b in micro)], d)[0])
        self.step += 1
        return {
            "step": self.step,
            "loss": totals["loss"],
            "loss_diff": totals["loss_diff"],
            "loss_ar": totals["loss_ar"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            "tokens": tokens,
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        """Per-token loss on the first ``eval_batches`` eval rows, with fixed noise."""
        self.model.eval()
        sums, counts = [0.0, 0.0], [0, 0]
        rows = len(self.eval_set)
        for i in range(min(self.cfg.eval_batches, rows)):
            batch = self.eval_set[[i]].to(self.d.device)
            v = self.objective.views(batch, row_seeds=[_row_seed(self.cfg.seed, -1, i)])
            parts = self.objective.parts(self.model, batch, v)
            sums[0] += parts.sum_diff.item()
            sums[1] += parts.sum_ar.item()
            counts[0] += parts.n_diff
            counts[1] += parts.n_ar
        self.model.train()
        return self._totals(sums[0], counts[0], sums[1], counts[1])["loss"]

    def _totals(self, sum_diff: float, n_diff: float, sum_ar: float, n_ar: float) -> dict[str, float]:
        """Per-token losses from summed CE and counts, by the objective's own definition (LossParts)."""
        parts = LossParts(torch.tensor(sum_diff), int(n_diff), torch.tensor(sum_ar), int(n_ar),
                          self.objective.ar_weight)
        return parts.metrics()

    # ---------------------------------------------------------------------------------------------- the loop
    def run(self) -> list[dict[str, float]]:
        cfg, d = self.cfg, self.d
        history = []
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not (d.main and cfg.progress),
                   dynamic_ncols=True)
        start = time.perf_counter()
        tokens = 0
        try:
            while self.step < cfg.steps:
                metrics = self.train_step()
                tokens += metrics["tokens"]
                metrics["tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
                if cfg.eval_every and self.eval_set is not None and self.step % cfg.eval_every == 0:
                    metrics["eval_loss"] = self.evaluate()
                history.append(metrics)
                if d.main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    with open(self.out / METRICS_FILE, "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    checkpointing.save(self.out, self.step, self.model, self.optimizer, self.sampler.state_dict(),
                                       d, cfg.model, cfg.keep_last, metrics, dtypes=self.stored_dtypes)
        finally:
            bar.close()
            teardown(d)
        return history

    def _truncate_log(self) -> None:
        """On resume, drop log lines of steps after the checkpoint: they are about to be redone. A line cut short
        by the crash (not valid JSON) is dropped too."""
        log = self.out / METRICS_FILE
        if log.exists():
            keep = []
            for line in log.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.step:
                        keep.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            log.write_text("".join(line + "\n" for line in keep))
