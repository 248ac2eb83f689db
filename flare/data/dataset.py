"""PackedDataset: the packed rows of one source, indexable into PackedBatches, savable for memory-mapped reuse."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from flare.data.batch import PackedBatch
from flare.data.packing import pack_documents
from flare.data.sources import load_documents
from flare.data.tokenizers import ChatTokenizer


class PackedDataset:
    """N packed rows of length L from one source.

    Stored as int32 ids and doc ids (vocabularies and row lengths fit; half the memory of int64); rows come
    out as the int64 PackedBatch the objective expects.
    """

    def __init__(self, rows: PackedBatch, name: str = "default", stats: Counter | None = None) -> None:
        self.name = name
        self.input_ids = rows.input_ids.to(torch.int32)  # [N, L]
        self.loss_mask = rows.loss_mask  # [N, L] bool
        self.doc_ids = rows.doc_ids.to(torch.int32)  # [N, L]
        self.stats = stats if stats is not None else Counter()

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer: ChatTokenizer, *, seq_len: int, block_size: int,
                   name: str | None = None, on_error: str = "skip", dedup: bool = False,
                   overflow: str = "truncate", min_tokens: int = 0, use_template: bool = True) -> "PackedDataset":
        """Read, validate, (deduplicate,) render and pack one chat JSONL file; ``stats`` holds every count."""
        stats: Counter = Counter()
        docs = load_documents(path, tokenizer, on_error=on_error, dedup=dedup, stats=stats,
                              use_template=use_template, min_tokens=min_tokens)
        rows = pack_documents(docs, seq_len, block_size, tokenizer.pad_id, overflow=overflow, stats=stats)
        if rows.input_ids.shape[0] == 0:
            raise ValueError(f"{path}: no usable rows (counts: {dict(stats)})")
        return cls(rows, name or Path(path).name.split(".")[0], stats)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def __getitem__(self, index: int | Sequence[int] | torch.Tensor) -> PackedBatch:
        """Rows ``index`` as a PackedBatch [len(index), L] (an int gives one row, [1, L])."""
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        return PackedBatch(self.input_ids[idx].long(), self.loss_mask[idx], self.doc_ids[idx].long())

    def save(self, path: str | Path) -> None:
        """One ``.pt`` file (plain tensors and counts; loads without pickle of custom classes)."""
        torch.save({"name": self.name, "input_ids": self.input_ids, "loss_mask": self.loss_mask,
                    "doc_ids": self.doc_ids, "stats": dict(self.stats)}, Path(path))

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = True) -> "PackedDataset":
        """Load a saved dataset; with ``mmap`` the tensors stay on disk and pages load on demand (data-parallel
        ranks then share one copy in the page cache)."""
        state = torch.load(Path(path), mmap=mmap, weights_only=True)
        ds = cls.__new__(cls)
        ds.name, ds.stats = state["name"], Counter(state["stats"])
        ds.input_ids, ds.loss_mask, ds.doc_ids = state["input_ids"], state["loss_mask"], state["doc_ids"]
        return ds
