"""Training data: chat rendering, label masks, packing into block-aligned rows."""

from flare.data.batch import PackedBatch

__all__ = ["PackedBatch"]
