"""What one forward pass needs to know besides the hidden states: its layout, positions, mask and cache.

Four layouts, one per way the model is run:

- ``causal``: ordinary rows, optionally continuing and writing a cache (prefill, decode steps);
- ``packed``: training rows holding several documents, causal within each (AR training);
- ``two_stream``: ``[x0 ; xt_1 ; ... ; xt_V]`` training rows, the FLARE objective's forward (method §2);
- ``rows``: inference rows ``[clean x num_clean ; noisy ...]`` that read a cache and never write it (§3).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import NamedTuple

import torch

from flare import block_mask, masks
from flare.model.cache import CommitRecord, ModelCache
from flare.model.layers import Rotary, rotary
from flare.model.noisy_blocks import NoisyBlocks
from flare.model.row_tree import RowTree
from flare.model.segments import Segments
from flare.ops.attention import fold_mask


def use_flex(device: torch.device | str) -> bool:
    """Flex attention runs where it is compiled for: CUDA devices with a torch that ships it."""
    if torch.device(device).type != "cuda":
        return False
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


@dataclass
class StreamMasks:
    """Two-stream attention split by stream: clean rows over clean keys, each noisy span of rows over
    [clean ; the span] (a span per view, or one span of kept blocks: ``flare.model.noisy_blocks``)."""

    L: int
    clean: torch.Tensor  # [B, 1, L, L]
    noisy: list[torch.Tensor]  # per span [B, 1, n, L + n]
    spans: list[range]  # the rows of each span


def _stream_masks(rule, B: int, L: int, spans: list[range], device) -> StreamMasks:
    pos = torch.arange(L, device=device)
    clean = masks.materialize_at(rule, B, pos, pos)
    per_span = []
    for span in spans:
        rows = torch.arange(span.start, span.stop, device=device)
        per_span.append(masks.materialize_at(rule, B, rows, torch.cat([pos, rows])))
    return StreamMasks(L, clean, per_span, spans)


@dataclass(frozen=True)
class Packed:
    doc_ids: torch.Tensor  # [B, L]


@dataclass(frozen=True)
class TwoStream:
    doc_ids: torch.Tensor  # [B, L]
    block_size: int
    views: int = 1
    clean_readout: str = "token"
    # The noisy stream holds only these blocks (None: every block of every view, V * L rows).
    noisy: NoisyBlocks | None = None


@dataclass(frozen=True)
class Rows:
    """Rows [clean x num_clean ; noisy x num_noisy ; padding] after a cache. Either count may differ per
    sequence (a [B] tensor); ``num_noisy`` defaults to all rows after the clean ones. ``seeds`` [B, T] splits
    the noisy rows into groups, each seeded after its own clean prefix (``flare.model.row_tree``); without it
    they form one group after all clean rows."""

    num_clean: int | torch.Tensor
    num_noisy: int | torch.Tensor | None = None
    seeds: torch.Tensor | None = None
    tree: RowTree | None = None  # built from these counts and seeds before (reused across forwards)

    def counts(self, batch: int, rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_clean [B], num_noisy [B]) as tensors. Counts given as ints are checked against the number of rows;
        tensor counts come from the decoding stepper, which builds them in range, and are not read back (that
        would be a host sync per forward)."""
        clean = torch.as_tensor(self.num_clean, device=device).expand(batch)
        noisy = rows - clean if self.num_noisy is None else torch.as_tensor(self.num_noisy, device=device).expand(batch)
        host = [c for c in (self.num_clean, self.num_noisy) if c is not None]
        if all(isinstance(c, int) for c in host) and not (
                0 <= self.num_clean and (self.num_noisy is None or 0 <= self.num_noisy <= rows - self.num_clean)
                and self.num_clean <= rows):
            raise ValueError(f"rows layout needs 0 <= num_clean, num_noisy and num_clean + num_noisy <= {rows}; "
                             f"got num_clean={self.num_clean}, num_noisy={self.num_noisy}")
        return clean, noisy


Layout = Packed | TwoStream | Rows | None


class RowMeta(NamedTuple):
    """What every recurrent layer of a rows forward needs of its layout, made once per forward (a few small ops
    each, which 18 layers would otherwise repeat)."""

    valid: torch.Tensor  # [B, T] bool: the clean and noisy rows (the rest is padding)
    reads: torch.Tensor | None  # [B, T] long: the row whose recurrent state a row reads (None: its own)

    @classmethod
    def of(cls, clean: torch.Tensor, noisy: torch.Tensor, rows: int, layout: "Rows | None" = None,
           tree: RowTree | None = None) -> "RowMeta":
        """From the per-sequence counts [B]: noisy rows read the block-end state, that of the last row (padding
        rows leave it unchanged); with a tree, each group's reads are the tree's own (``reads`` None here)."""
        idx = torch.arange(rows, device=clean.device)
        valid = idx < (clean + noisy)[:, None]
        if tree is not None or (layout is not None and _no_noisy_rows(layout, rows)):
            return cls(valid, None)
        return cls(valid, torch.where(idx < clean[:, None], idx, rows - 1))


def _no_noisy_rows(layout: "Rows", rows: int) -> bool:
    """Whether the layout says, without reading the device, that no sequence has a noisy row."""
    if isinstance(layout.num_noisy, int):
        return layout.num_noisy == 0
    return layout.num_noisy is None and isinstance(layout.num_clean, int) and layout.num_clean == rows


@dataclass
class ForwardContext:
    mode: str
    rope: Rotary  # of each row's position
    attn_mask: torch.Tensor | None  # [B, 1, T, S] bool, or None for plain causal over the T rows
    cache: ModelCache | None = None
    # Cache slot of each row (with a cache): [B, T], or a range when every sequence writes the same slots.
    write_pos: torch.Tensor | range | None = None
    n_new: torch.Tensor | None = None  # [B] real rows per sequence (right padding after them)
    valid: torch.Tensor | None = None  # [B, T] bool
    segments: Segments | None = None  # packed / two_stream: documents as segments
    layout: Layout = None
    record: CommitRecord | None = None  # rows mode: keep what the clean rows would commit
    row_meta: RowMeta | None = None  # rows mode: which rows are real, which state each reads
    tree: RowTree | None = None  # rows mode with seeded groups
    # causal mode: the recurrent states are written into the cache's own tensors (never replaced by new ones),
    # so that a CUDA graph replaying the forward finds them where it captured them (flare.engine.graphed)
    in_place: bool = False
    # causal and rows modes, compiled for the cache's whole capacity: the key slots attention reads (a one-element
    # CPU tensor; ``flare.ops.attention.span_attention``)
    span: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # ``attn_mask`` folded for attention's query heads (``folded_mask``), per (heads a key/value head, dtype):
        # an attribute, not a field, so that every copy (``dataclasses.replace``, as DDP copies a dataclass input
        # to its device) starts without the original's.
        self.folded: dict = {}

    def folded_mask(self, r: int, dtype: torch.dtype) -> torch.Tensor:
        """``attn_mask`` (boolean) as attention folds it for r query heads a key/value head (``fold_mask``), made
        once per forward for all its attention layers."""
        key = (r, dtype)
        if key not in self.folded:
            self.folded[key] = fold_mask(self.attn_mask, r, dtype)
        return self.folded[key]

    @classmethod
    def build(
        cls,
        input_ids_BT: torch.Tensor,
        *,
        rotary_dim: int,
        head_dim: int,
        rope_theta: float,
        dtype: torch.dtype,
        cache: ModelCache | None = None,
        valid_BT: torch.Tensor | None = None,
        layout: Layout = None,
        record: CommitRecord | None = None,
    ) -> "ForwardContext":
        B, T = input_ids_BT.shape
        device = input_ids_BT.device

        def rope(positions: torch.Tensor | range, limit: int) -> Rotary:
            return rotary(positions, rotary_dim, head_dim, rope_theta, dtype, device, limit)

        if isinstance(layout, (Packed, TwoStream)):
            if cache is not None or valid_BT is not None:
                raise ValueError("packed and two-stream forwards take neither a cache nor right padding")
            block = layout.block_size if isinstance(layout, TwoStream) else 1
            segments = Segments.from_doc_ids(layout.doc_ids, block)
            if isinstance(layout, Packed):
                if layout.doc_ids.shape != input_ids_BT.shape:
                    raise ValueError(f"doc_ids {tuple(layout.doc_ids.shape)} must match input_ids "
                                     f"{tuple(input_ids_BT.shape)}")
                rule, positions = masks.packed_causal(layout.doc_ids), segments.positions
                mode = "packed"
            else:
                L, kept = layout.doc_ids.shape[1], layout.noisy
                rows = layout.views * L if kept is None else kept.rows
                if layout.views < 1 or T != L + rows:
                    raise ValueError(f"a two-stream row holds L + {rows} = {L + rows} tokens "
                                     f"(L={L}, views={layout.views}), got {T}")
                if kept is None:
                    rule = masks.two_stream(layout.doc_ids, layout.block_size, layout.clean_readout)
                    positions = segments.positions.repeat(1, 1 + layout.views)
                    spans = [range((v + 1) * L, (v + 2) * L) for v in range(layout.views)]
                else:
                    rule = masks.two_stream(layout.doc_ids, layout.block_size, layout.clean_readout,
                                            kept.row_view, kept.row_pos)
                    positions = torch.cat([segments.positions, segments.positions.gather(1, kept.row_pos)], 1)
                    spans = [range(L, T)]
                mode = "two_stream"
            rot = rope(positions, T)  # positions count from each document's start
            if use_flex(device):
                # GPU: a sparse BlockMask of the same rule, built tile by tile from the layout (never a dense
                # [T, T] mask, cached per layout); flex attention skips every fully masked tile.
                if mode == "two_stream" and layout.noisy is not None:
                    mask = masks.block_mask(rule, B, T, T, device)
                elif mode == "two_stream":
                    mask = block_mask.two_stream(layout.doc_ids, layout.block_size, layout.views,
                                                 layout.clean_readout)
                else:
                    mask = block_mask.packed(layout.doc_ids)
            elif mode == "two_stream":
                # CPU: no stream ever sees another view, and clean rows never see noisy ones, so attention runs
                # per stream over only the keys it can see ((1 + 2V) L^2 scores instead of (1 + V)^2 L^2).
                mask = _stream_masks(rule, B, layout.doc_ids.shape[1], spans, device)
            else:
                mask = masks.materialize(rule, B, T, T, device)
            return cls(mode, rot, mask, segments=segments, layout=layout)

        if isinstance(layout, Rows):
            if cache is None:
                raise ValueError("inference rows read a cache: pass one")
            clean, noisy = layout.counts(B, T, device)
            cache.reserve(T)
            slots = _cache_positions(cache, T)  # each row's scratch KV slot
            tree = None
            if layout.seeds is None:
                positions = slots
                rule = masks.inference_rows(cache.lengths, clean, clean + noisy)
            else:
                tree = layout.tree or RowTree.build(clean, noisy, layout.seeds)
                positions = cache.lengths[:, None] + tree.depth  # a group row sits after its own prefix
                rule = masks.inference_tree(cache.lengths, tree.sees(), tree.real)
            if tree is not None and cache.bound_exact:
                mask = masks.after_committed(tree.own_mask(), cache.bound)
            else:
                mask = masks.materialize(rule, B, T, cache.bound + T, device)
            rot = rope(positions, cache.bound + T)
            if record is not None:
                record.rows = T
            return cls("rows", rot, mask, cache=cache, write_pos=slots, layout=layout,
                       record=record, row_meta=RowMeta.of(clean, noisy, T, layout, tree), tree=tree)

        if layout is not None:
            raise TypeError(f"unknown layout {layout!r}")
        if record is not None:
            raise ValueError("only a rows forward records a commit")
        n_new = valid_BT.sum(1) if valid_BT is not None else None
        if cache is None:
            positions = range(T)
            mask = None
            if valid_BT is not None:
                mask = masks.materialize(masks.causal_from(torch.zeros(B, dtype=torch.long, device=device)),
                                         B, T, T, device)
            write_pos = None
        else:
            cache.reserve(T)
            positions = write_pos = _cache_positions(cache, T)
            # A single-token step needs no mask while every length equals the bound: every key slot up to
            # bound + 1 is then committed or the step's own row.
            if T == 1 and cache.bound_exact:
                mask = masks.ALL_VISIBLE
            else:
                mask = masks.materialize(masks.causal_from(cache.lengths), B, T, cache.bound + T, device)
        rot = rope(positions, T if cache is None else cache.bound + T)
        return cls("causal", rot, mask, cache, write_pos, n_new, valid_BT)


def _cache_positions(cache: ModelCache, T: int) -> torch.Tensor | range:
    """Positions of T new rows after each sequence's length: a ``range`` when every length is known to equal the
    host-side bound (no device tensors to build or index with), else [B, T]."""
    if cache.bound_exact:
        return range(cache.bound, cache.bound + T)
    steps = cache.lengths[:, None]
    return steps if T == 1 else steps + torch.arange(T, device=steps.device)
