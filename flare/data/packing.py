"""Packing documents into fixed-length, block-aligned rows (method §2.2: document starts must be block-aligned).

Each document is padded with ``pad_id`` (label False, same doc id) to a multiple of ``block_size``, so every
document of a row starts at a multiple of the block size. Documents are placed by best-fit decreasing (the
fullest row that still has room); inside a row they keep their input order. A row's trailing padding gets a
doc id of its own. Call once per source: rows never mix sources.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import Counter
from typing import Iterable

import torch

from flare.data.batch import PackedBatch
from flare.data.document import Document

OVERFLOW = ("truncate", "drop")


def padded_length(n: int, block_size: int) -> int:
    return -(-n // block_size) * block_size


def best_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices, ascending) holding items of ``sizes`` (each <= capacity), best fit first.

    Free space is tracked by distinct remaining capacity (a sorted list plus a stack of bins per capacity), so
    placing an item costs O(log #capacities) rather than a scan over the bins.
    """
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}
    rooms: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        size = sizes[i]
        if not 0 < size <= capacity:
            raise ValueError(f"item {i} has size {size}, outside (0, {capacity}]")
        k = bisect_left(rooms, size)
        if k < len(rooms):
            room = rooms[k]
            b = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        else:
            b, room = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        room -= size
        if room > 0:
            if room not in by_room:
                by_room[room] = []
                insort(rooms, room)
            by_room[room].append(b)
    return [sorted(members) for members in bins]


def _fit(docs: Iterable[Document], seq_len: int, overflow: str, stats: Counter) -> list[Document]:
    """Documents that can be placed: long ones truncated to ``seq_len`` (or dropped), label-free ones dropped."""
    kept = []
    for doc in docs:
        if len(doc) > seq_len:
            if overflow == "drop":
                stats["dropped_too_long"] += 1
                continue
            stats["truncated"] += 1
            stats["truncated_tokens"] += len(doc) - seq_len
            doc = Document(doc.input_ids[:seq_len], doc.loss_mask[:seq_len])
        if not any(doc.loss_mask):
            # Nothing to learn from (empty, or a prompt that filled the whole row before truncation).
            stats["dropped_no_labels"] += 1
            continue
        kept.append(doc)
    return kept


def pack_documents(docs: Iterable[Document], seq_len: int, block_size: int, pad_id: int, *,
                   overflow: str = "truncate", stats: Counter | None = None) -> PackedBatch:
    """All ``docs`` packed into a PackedBatch of N rows: input_ids [N, seq_len], loss_mask, doc_ids (per row).

    ``overflow``: what to do with a document longer than ``seq_len``: ``"truncate"`` (keep its first
    ``seq_len`` tokens) or ``"drop"``. Counts in ``stats``: rows, tokens, supervised_tokens, pad_tokens,
    truncated, truncated_tokens, dropped_too_long, dropped_no_labels.
    """
    if block_size < 1 or seq_len < 1 or seq_len % block_size:
        raise ValueError(f"seq_len ({seq_len}) must be a positive multiple of block_size ({block_size})")
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    stats = stats if stats is not None else Counter()
    kept = _fit(docs, seq_len, overflow, stats)
    sizes = [padded_length(len(d), block_size) for d in kept]
    ids_rows, mask_rows, doc_rows = [], [], []
    for members in best_fit_decreasing(sizes, seq_len):
        ids: list[int] = []
        mask: list[bool] = []
        doc_ids: list[int] = []
        for d, i in enumerate(members):
            doc, pad = kept[i], sizes[i] - len(kept[i])
            ids += doc.input_ids + [pad_id] * pad
            mask += doc.loss_mask + [False] * pad
            doc_ids += [d] * sizes[i]
        tail = seq_len - len(ids)
        ids_rows.append(ids + [pad_id] * tail)
        mask_rows.append(mask + [False] * tail)
        doc_rows.append(doc_ids + [len(members)] * tail)
    n_tokens = sum(len(d) for d in kept)
    stats["rows"] += len(ids_rows)
    stats["tokens"] += n_tokens
    stats["supervised_tokens"] += sum(d.num_supervised for d in kept)
    stats["pad_tokens"] += len(ids_rows) * seq_len - n_tokens
    shape = (len(ids_rows), seq_len)
    return PackedBatch(
        torch.tensor(ids_rows, dtype=torch.long).reshape(shape),
        torch.tensor(mask_rows, dtype=torch.bool).reshape(shape),
        torch.tensor(doc_rows, dtype=torch.long).reshape(shape),
    )
