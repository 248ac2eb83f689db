"""Sampler: an endless, seeded, resumable stream of PackedBatches over one or several packed sources.

The stream is defined globally, then sharded: each step draws ``batch_size * world_size`` rows (a source per
row from the mixture, then that source's next row in its per-epoch shuffled order) and rank r keeps the r-th
slice of ``batch_size`` rows. So ranks see disjoint rows, one epoch of a single source is covered exactly once
across ranks, and every rank holds the same ``state_dict()``. A source that runs out starts its next epoch (a
new permutation); small sources are thereby repeated as often as their weight asks.

The permutation of (source, epoch) is a pure function of the seed, so the position is just (epoch, index) per
source plus the mixture generator's state. Because the global stream does not depend on the batch size or the
number of ranks, a run may resume with a different ``world_size`` or ``batch_size`` without repeating or
skipping rows.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch

from flare.data.batch import PackedBatch
from flare.data.dataset import PackedDataset
from flare.data.mixture import Mixture


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from the parts (stable across processes and Python versions, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Sampler:
    def __init__(self, sources: PackedDataset | Mapping[str, PackedDataset], batch_size: int, *,
                 weights: Mapping[str, float] | Mixture | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True) -> None:
        """``weights=None`` weighs sources by their number of rows (as if they were concatenated)."""
        if isinstance(sources, PackedDataset):
            sources = {sources.name: sources}
        if not sources:
            raise ValueError("the sampler needs at least one source")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        for name, ds in sources.items():
            if len(ds) == 0:
                raise ValueError(f"source {name!r} has no rows")
        lengths = {ds.seq_len for ds in sources.values()}
        if len(lengths) != 1:
            raise ValueError(f"all sources must share one row length, got {sorted(lengths)}")
        if weights is None:
            weights = {name: len(ds) for name, ds in sources.items()}
        self.mixture = weights if isinstance(weights, Mixture) else Mixture(weights)
        if set(self.mixture.names) != set(sources):
            raise ValueError(f"mixture sources {sorted(self.mixture.names)} != datasets {sorted(sources)}")
        self.sources = dict(sources)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.steps = 0
        # Source of every row of the last batch, e.g. for per-source loss metrics.
        self.last_sources: list[str] = []
        self._cursors = {name: [0, 0] for name in self.sources}  # name -> [epoch, index within the epoch]
        self._rng = torch.Generator().manual_seed(derived_seed(seed, "mixture"))
        self._orders: dict[str, tuple[int, torch.Tensor]] = {}

    def _order(self, name: str, epoch: int) -> torch.Tensor:
        """[N] row order of ``name`` in ``epoch`` (cached for the current epoch)."""
        cached = self._orders.get(name)
        if cached is None or cached[0] != epoch:
            n = len(self.sources[name])
            if self.shuffle:
                g = torch.Generator().manual_seed(derived_seed(self.seed, name, epoch))
                order = torch.randperm(n, generator=g)
            else:
                order = torch.arange(n)
            cached = self._orders[name] = (epoch, order)
        return cached[1]

    def _take(self, name: str) -> int:
        cursor = self._cursors[name]
        row = int(self._order(name, cursor[0])[cursor[1]])
        cursor[1] += 1
        if cursor[1] == len(self.sources[name]):
            cursor[0], cursor[1] = cursor[0] + 1, 0
        return row

    def next_rows(self) -> list[tuple[str, int]]:
        """Advance one step; the (source, row index) pairs of this rank's batch."""
        names = self.mixture.sample(self.batch_size * self.world_size, self._rng)
        rows = [(name, self._take(name)) for name in names]
        self.steps += 1
        return rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __iter__(self) -> "Sampler":
        return self

    def __next__(self) -> PackedBatch:
        """The next batch: input_ids, loss_mask, doc_ids, each [batch_size, L]."""
        rows = self.next_rows()
        self.last_sources = [name for name, _ in rows]
        pick = [(self.sources[name], i) for name, i in rows]
        return PackedBatch(
            torch.stack([ds.input_ids[i] for ds, i in pick]).long(),
            torch.stack([ds.loss_mask[i] for ds, i in pick]),
            torch.stack([ds.doc_ids[i] for ds, i in pick]).long(),
        )

    @property
    def epochs(self) -> dict[str, float]:
        """Passes made over each source so far (fractional)."""
        return {n: e + i / len(self.sources[n]) for n, (e, i) in self._cursors.items()}

    def state_dict(self) -> dict[str, Any]:
        """The position of the stream (identical on every rank); save it with the model checkpoint."""
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "sizes": {n: len(ds) for n, ds in self.sources.items()},
            "cursors": {n: list(c) for n, c in self._cursors.items()},
            "rng": self._rng.get_state(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state``: the following batches equal those an uninterrupted run would have produced."""
        sizes = {n: len(ds) for n, ds in self.sources.items()}
        if state["sizes"] != sizes:
            raise ValueError(f"sampler state is for sources {state['sizes']}, these are {sizes}")
        if state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise ValueError("sampler state was saved with another seed or shuffle setting")
        self._cursors = {n: [int(e), int(i)] for n, (e, i) in state["cursors"].items()}
        self._rng.set_state(state["rng"].clone())
        self.steps = int(state["steps"])
        self._orders.clear()
