"""Per-sequence decoding state: a KV cache for attention layers, conv + recurrent state for Gated DeltaNet layers.

Row b of every tensor belongs to sequence b. ``lengths[b]`` counts the tokens committed for that sequence; the
KV slots past it hold nothing meaningful and are masked out. The conv state, and the recurrent state with the
commits it keeps applied (``RecurrentState.pending``), are always exactly the state after ``lengths[b]``
tokens. Read-only rows forwards use the KV slots past the length as scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flare.config import FULL_ATTENTION, ModelConfig
from flare.model.writes import emptied, written
from flare.ops.gated_delta.pending import PendingCommits
from flare.ops.gated_delta.pending_stack import PendingStack
from flare.ops.gated_delta.rows import RowsScan, updates_after
from flare.ops.precision import accum_dtype, cast
from flare.ops.take import row_index, take_flat


# The capacity of a cache without attention layers: no KV slots to bound it.
NO_KV = 1 << 62


@dataclass
class AttentionState:
    # Head-major: each key/value head's slots are one contiguous run, as attention reads them (on the CPU a
    # token-major [B, capacity, Hkv, D] store made SDPA read strided rows: 8 sequences of Qwen3.5-0.8B's heads
    # over 1,040 keys, one query row, 3.2 against 1.7 ms a layer; benchmarks/bench_attention.py).
    k: torch.Tensor  # [B, Hkv, capacity, D]
    v: torch.Tensor  # [B, Hkv, capacity, D]


@dataclass
class RecurrentState:
    conv: torch.Tensor  # [B, K-1, C]: the last K-1 conv inputs
    ssm: torch.Tensor  # [B, H, Dk, Dv], fp32: the recurrent state, once ``pending`` is applied to it
    pending: PendingCommits  # commits not yet written to ``ssm`` (ops.gated_delta.pending)

    def settle(self) -> None:
        """Write the kept commits into ``ssm``, for a pass that reads or writes the state whole."""
        self.ssm = self.pending.settle(self.ssm)


@dataclass
class CommitRecord:
    """What the clean rows of a read-only rows forward would write to the recurrent layers, kept so that an
    accepted prefix of them can be committed without another forward (no replay of the accepted tokens:
    ``benchmarks/bench_commit.py`` measured a verify round with its commit at 0.59x the time of one with a
    replay on the tiny model at batch 8, N 4, and 0.41x on the 0.75B one): per GDN layer, the closed-form rows
    pass, whose deltas give the state after any prefix in one product, and the conv inputs. Their keys/values
    already sit in the scratch KV slots right after each sequence's length."""

    rows: int
    # GDN layer -> (its rows pass, which gives the state after any prefix: ops.gated_delta.RowsScan),
    # the conv's inputs [carried state ; rows] [B, K-1+T, C] (ops.conv.conv_inputs)
    gdn: dict[int, tuple[RowsScan, torch.Tensor]]

    @classmethod
    def empty(cls) -> "CommitRecord":
        return cls(0, {})


class ModelCache:
    def __init__(self, lengths: torch.Tensor, layers: list[AttentionState | RecurrentState], bound: int,
                 stack: PendingStack | None = None) -> None:
        self.lengths = lengths  # [B] int64
        self.layers = layers
        # The recurrent layers' kept commits as one stack (their ``pending`` are its views), None where states
        # are written at once: a commit adds to all layers in a few ops.
        self.stack = stack
        # Host-side upper bound of lengths.max(), so that growing and slicing never sync with the device;
        # bound_exact says every sequence's length is known to equal it (all advanced alike since the last check).
        self.bound = bound
        self.bound_exact = True

    @classmethod
    def empty(
        cls,
        config: ModelConfig,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        capacity: int = 128,
    ) -> "ModelCache":
        layers: list[AttentionState | RecurrentState] = []
        for kind in config.layer_types:
            if kind == FULL_ATTENTION:
                shape = (batch_size, config.num_key_value_heads, capacity, config.head_dim)
                layers.append(AttentionState(torch.zeros(shape, device=device, dtype=dtype),
                                             torch.zeros(shape, device=device, dtype=dtype)))
            else:
                channels = 2 * config.linear_num_key_heads * config.linear_key_head_dim + (
                    config.linear_num_value_heads * config.linear_value_head_dim
                )
                conv = torch.zeros(batch_size, config.linear_conv_kernel_dim - 1, channels, device=device, dtype=dtype)
                ssm = torch.zeros(
                    batch_size, config.linear_num_value_heads, config.linear_key_head_dim,
                    config.linear_value_head_dim, device=device, dtype=accum_dtype(dtype),
                )
                layers.append(RecurrentState(conv, ssm, None))  # (its kept commits below)
        recurrent = [layer for layer in layers if isinstance(layer, RecurrentState)]
        stack = PendingStack.empty([layer.ssm for layer in recurrent])
        for i, layer in enumerate(recurrent):
            layer.pending = stack.views[i] if stack is not None else PendingCommits.empty(layer.ssm)
        lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls(lengths, layers, 0, stack)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        for layer in self.layers:
            if isinstance(layer, AttentionState):
                return layer.k.shape[2]
        return NO_KV

    def reserve(self, new_tokens: int) -> None:
        """Grow the KV slots (doubling) so that ``new_tokens`` more fit after the longest sequence."""
        need = self.bound + new_tokens
        cap = self.capacity
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        for layer in self.layers:
            if isinstance(layer, AttentionState):
                B, G, old, D = layer.k.shape
                layer.k = torch.cat([layer.k, layer.k.new_zeros(B, G, cap - old, D)], 2)
                layer.v = torch.cat([layer.v, layer.v.new_zeros(B, G, cap - old, D)], 2)

    def write_kv(
        self, layer_idx: int, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor, write_pos: torch.Tensor | range
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values at their slots (``write_pos`` [B, T], or a range of slots shared by every
        sequence); return all keys/values up to the bound [B, S, Hkv, D] (a view of the head-major store)."""
        layer = self.layers[layer_idx]
        assert isinstance(layer, AttentionState)
        k, v = layer.k.transpose(1, 2), layer.v.transpose(1, 2)  # [B, capacity, Hkv, D] views
        if isinstance(write_pos, range):
            k[:, write_pos.start:write_pos.stop] = k_BTHD
            v[:, write_pos.start:write_pos.stop] = v_BTHD
        else:
            rows = torch.arange(k_BTHD.shape[0], device=k_BTHD.device)[:, None].expand_as(write_pos)
            k[rows, write_pos] = cast(k_BTHD, k.dtype)
            v[rows, write_pos] = cast(v_BTHD, v.dtype)
        span = self.bound + k_BTHD.shape[1]
        return k[:, :span], v[:, :span]

    def advance(self, n_new_B: torch.Tensor | int, max_new: int, uniform: bool = False) -> None:
        """Add n_new[b] tokens to each sequence (an int: the same for all); ``uniform``: every sequence got
        exactly ``max_new``."""
        self.lengths = self.lengths + n_new_B
        self.bound += max_new
        self.bound_exact = self.bound_exact and uniform

    def tighten(self, longest: int, shortest: int | None = None) -> None:
        """Lower the host-side bound to the true longest length (read off the device by the caller, with the
        shortest one when known: equal, every sequence has the bound's length)."""
        self.bound = longest
        self.bound_exact = self.batch_size == 1 or shortest == longest

    def commit(self, record: "CommitRecord", n_accept_B: torch.Tensor, ends_B: torch.Tensor | None = None) -> None:
        """Advance every sequence by its first ``n_accept[b]`` recorded clean rows, exactly as a causal pass
        over those tokens would: their keys/values (already in the slots after the length), the recurrent state
        after the last of them (kept as an update of the stored one until a causal forward or the update's room
        asks for it to be written), and the conv inputs that end there. The rejected rows' KV slots lie past the
        new length, where nothing reads them. ``ends`` [B] (None: -1 everywhere): where >= 0, the sequence
        commits row 0 and then that row, a branch seeded after row 0 (``flare.decoding.groups``; n_accept 2)."""
        T = record.rows
        B = self.batch_size
        end = n_accept_B - 1 if ends_B is None else torch.where(ends_B >= 0, ends_B, n_accept_B - 1)
        last = end.clamp(min=0).view(B, 1, 1, 1)  # shared by every layer
        if ends_B is not None:
            self._branch_kv(ends_B)
        recurrent = [(i, layer) for i, layer in enumerate(self.layers) if isinstance(layer, RecurrentState)]
        if not recurrent:
            self.advance(n_accept_B, T)
            return
        live = (n_accept_B > 0).view(B, 1, 1, 1).to(recurrent[0][1].ssm.dtype)
        # Every layer's update at once (the layers' states share one shape), then added to the stack of kept
        # commits, or each written or kept by its layer (no stack, or no room left in it after a settle).
        decay, k, u = updates_after([record.gdn[i][0] for i, _ in recurrent], last, live, T)
        stack = self._held_stack()
        if stack is not None and T > stack.room:
            for _, layer in recurrent:
                layer.settle()
        if stack is not None and T <= stack.room:
            stack.add(decay, k, u)
        else:
            for j, (_, layer) in enumerate(recurrent):
                layer.ssm = layer.pending.commit(layer.ssm, decay[j], k[j], u[j])
        # The K-1 conv inputs that end after the accepted rows, one index for every layer.
        inputs = record.gdn[recurrent[0][0]][1]
        K1 = recurrent[0][1].conv.shape[1]
        window = n_accept_B[:, None] + torch.arange(K1, device=inputs.device)
        if ends_B is not None and K1:  # a branch's window ends at its own row (the rows before it: row 0's)
            window[:, -1] = K1 + end
        rows = row_index(window, inputs.shape[1])
        for i, layer in recurrent:
            layer.conv = written(layer.conv, take_flat(record.gdn[i][1], rows))
        self.advance(n_accept_B, T)

    def _branch_kv(self, ends_B: torch.Tensor) -> None:
        """The keys/values of each branch row (``commit``'s ``ends``) into the slot after row 0's, where the
        commit's second token sits (copied onto itself where there is no branch)."""
        B = self.batch_size
        src = (self.lengths + ends_B.clamp(min=1)).view(B, 1, 1, 1)
        dst = (self.lengths + 1).view(B, 1, 1, 1)
        for layer in self.layers:
            if isinstance(layer, AttentionState):
                for x in (layer.k, layer.v):
                    at = (B, x.shape[1], 1, x.shape[3])
                    x.scatter_(2, dst.expand(at), x.gather(2, src.expand(at)))

    def pending_room(self) -> int:
        """Rows a commit can add to the recurrent states before they must be written (``settle``)."""
        return min((layer.pending.room for layer in self.layers if isinstance(layer, RecurrentState)),
                   default=1 << 62)

    def settle(self) -> None:
        """Write every recurrent state's kept commits (before a causal forward, which reads and writes the
        states whole). A narrowed cache cannot: settle the cache it came from before narrowing."""
        for layer in self.layers:
            if isinstance(layer, RecurrentState):
                layer.settle()

    def narrow(self, n: int) -> "ModelCache":
        """The first ``n`` sequences as a cache of views (KV writes land in this cache); ``absorb`` takes the
        rest of a forward's changes back. Call ``reserve`` on this cache first, so the views never regrow."""
        stack = self._held_stack()
        stack = stack.narrow(n) if stack is not None else None
        views = iter(stack.views if stack is not None else [])
        layers: list[AttentionState | RecurrentState] = [
            AttentionState(layer.k[:n], layer.v[:n]) if isinstance(layer, AttentionState)
            else RecurrentState(layer.conv[:n], layer.ssm[:n], next(views) if stack else layer.pending.narrow(n))
            for layer in self.layers
        ]
        sub = ModelCache(self.lengths[:n], layers, self.bound, stack)
        sub.bound_exact = False
        return sub

    def absorb(self, sub: "ModelCache") -> None:
        """Take back the lengths and recurrent states of a ``narrow`` cache after it ran a forward: states the
        forward replaced are copied into the first rows; those it updated in place are there already (copying
        or catenating every slot's state would cost a pass over all of them per step, however few are busy)."""
        n = sub.batch_size
        self.lengths = torch.cat([sub.lengths, self.lengths[n:]])
        for mine, theirs in zip(self.layers, sub.layers):
            if isinstance(mine, RecurrentState):
                mine.pending.absorb(theirs.pending)
                for name in ("conv", "ssm"):
                    full, part = getattr(mine, name), getattr(theirs, name)
                    if part.data_ptr() != full.data_ptr() or part.stride() != full.stride():
                        full[:n].copy_(part)
            elif theirs.k.data_ptr() != mine.k.data_ptr():
                raise RuntimeError("a narrowed cache grew its KV slots: reserve on the full cache first")
        self.bound = max(self.bound, sub.bound)
        self.bound_exact = False

    def reset(self, rows: list[int]) -> None:
        """Empty the given sequences' caches (a slot handed to a new request); the others are untouched."""
        if not rows:
            return
        idx = torch.tensor(rows, device=self.lengths.device)
        self.lengths = self.lengths.index_fill(0, idx, 0)
        stack = self._held_stack()
        for layer in self.layers:
            if isinstance(layer, RecurrentState):
                # In place: a fresh state-sized tensor per layer is an allocation the CPU pays in page faults
                # (18 x 8 MB on a 0.75B model at 8 slots: 25-600 ms a reset here, ~12 ms in place). The states
                # are the cache's own tensors (never views of a forward's outputs); those made under inference
                # mode, which only it may change in place, are replaced.
                layer.conv = emptied(layer.conv, idx)
                layer.ssm = emptied(layer.ssm, idx)
                if stack is None:
                    layer.pending.clear(idx)
        if stack is not None:
            stack.clear(idx)
        self.bound_exact = False

    def take(self, rows: list[int], span: int) -> "ModelCache":
        """Sequences ``rows`` (without kept commits: just reset or restored, or ``settle`` first) as a cache of
        their own, copied, with ``span`` KV slots (at most this cache's capacity: what forwards over it may write,
        the bound and the rows they add); ``put`` writes it back. A prefill of a few slots then computes no row
        for the others; the prefix cache keeps a slot's state as one (``flare.engine.prefix_cache``)."""
        idx = torch.tensor(rows, device=self.lengths.device)
        span = min(span, self.capacity)
        layers: list[AttentionState | RecurrentState] = []
        for layer in self.layers:
            if isinstance(layer, AttentionState):
                layers.append(AttentionState(layer.k[idx, :, :span], layer.v[idx, :, :span]))
            else:
                ssm = layer.ssm[idx]
                layers.append(RecurrentState(layer.conv[idx], ssm, PendingCommits.empty(ssm, rows=0)))
        sub = ModelCache(self.lengths[idx], layers, self.bound)
        sub.bound_exact = False
        return sub

    def put(self, rows: list[int], sub: "ModelCache", length: int | None = None) -> None:
        """Write a ``take`` of ``rows`` back, after forwards over it: its KV up to its bound, which the capacity
        must still hold (``reserve`` here first). ``length``: only each sequence's first ``length`` tokens, its
        length then (the recurrent states must be those after exactly that many)."""
        idx = torch.tensor(rows, device=self.lengths.device)
        span = sub.bound if length is None else length
        for mine, theirs in zip(self.layers, sub.layers):
            if isinstance(mine, AttentionState):
                mine.k[idx, :, :span] = theirs.k[:, :, :span]
                mine.v[idx, :, :span] = theirs.v[:, :, :span]
            else:
                mine.conv[idx] = theirs.conv
                mine.ssm[idx] = theirs.pending.settle(theirs.ssm)
        lengths = sub.lengths if length is None else torch.full_like(sub.lengths, length)
        self.lengths = self.lengths.index_copy(0, idx, lengths)
        self.bound, self.bound_exact = max(self.bound, span), False

    def clone(self) -> "ModelCache":
        stack = self._held_stack()
        stack = stack.clone() if stack is not None else None
        views = iter(stack.views if stack is not None else [])
        layers: list[AttentionState | RecurrentState] = []
        for layer in self.layers:
            if isinstance(layer, AttentionState):
                layers.append(AttentionState(layer.k.clone(), layer.v.clone()))
            else:
                pending = next(views) if stack is not None else layer.pending.clone()
                layers.append(RecurrentState(layer.conv.clone(), layer.ssm.clone(), pending))
        out = ModelCache(self.lengths.clone(), layers, self.bound, stack)
        out.bound_exact = self.bound_exact
        return out

    def _held_stack(self) -> PendingStack | None:
        """The stack of kept commits, if the recurrent layers' updates are still its views (a caller may have
        given a layer an update of its own: then every layer goes its own way)."""
        recurrent = [layer.pending for layer in self.layers if isinstance(layer, RecurrentState)]
        return self.stack if self.stack is not None and self.stack.holds(recurrent) else None
