"""A recurrent state's commits kept as a low-rank update until something has to read the state whole.

After a read-only rows forward (AR-Trust's verify, a denoising block) the state after an accepted prefix of n
rows is (``rows.py``)

    S_n = e^{G_{n-1}} S + sum_{j<n} e^{G_{n-1} - G_j} k_j u_j^T.

Written at once, that is a pass that reads and writes every state: on a Qwen3.5-0.8B-shaped model at 8
sequences, 18 layers x 8 MB a round, a tenth of the round's time. The next rows forward reads the state only
through products x^T S with a few rows x, which the update gives without the state being written:

    x^T (c S + K^T U) = c (x^T S) + (x^T K^T) U,

so a commit multiplies c and the K rows already kept by its decay and appends its own rows to K and U; the
state is written once their room (``PENDING_ROWS``) is used up, or before a causal forward reads it whole
(``settle``). Sequences that commit nothing keep c = 1 and zero rows, so their state is exactly what it was.
"""

from __future__ import annotations

import contextlib

import torch

from flare.ops import precision

# Rows of K and U a state keeps before it is written (an AR-Trust commit appends gen_block rows: 4 commits of 4).
PENDING_ROWS = 16
# Only states of at least this many bytes per sequence keep their commits; smaller ones are written at once: a
# write of them costs about what the kept rows' products add to every rows pass (``benchmarks/bench_commit.py``,
# a verify round and its commit at 8 sequences, kept / written, one thread: 1.03-1.04x on the tiny random model,
# 16 KiB a state, 0.98-1.02x on the small one, 32 KiB; two threads: 0.97-0.98x on the 0.75B one, 1 MiB).
KEEP_MIN_STATE_BYTES = 256 << 10
# On a CPU a write scales the states and adds the update piece by piece, this many bytes of state at a time
# (about a core's L2 cache): both passes over a piece run before the next, so the second reads it from cache.
STATE_CHUNK_BYTES = 1 << 20
# While set (``reading_all``), ``read`` takes every row of the update, kept or not (zero keys past ``used``: the
# same sum): what a CUDA graph of a rows forward captures, since ``used`` changes between its replays.
READ_ALL = [False]
# Kept keys and decays below this are set to zero: far below anything they could change (fp32 resolves 2^-24
# of a value), and still far above the denormal floats (below 2^-126) their next products would make.
TINY = 2.0 ** -80


class PendingCommits:
    """The commits not yet written to a state ``S`` [B, H, Dk, Dv]: the state is ``scale * S + K^T U`` over the
    first ``used`` rows of ``k`` [B, H, R, Dk] and ``u`` [B, H, R, Dv] (``scale`` [B, H, 1, 1]).

    ``whole`` is False for the first sequences of a larger batch (``narrow``): they may add commits, but not
    write them (the rows of the other sequences share ``used``), so the caller settles the whole batch first.
    ``span``: the sequences, from the first, that may hold rows (a settle touches only their states)."""

    def __init__(self, scale: torch.Tensor, k: torch.Tensor, u: torch.Tensor, used: int = 0,
                 whole: bool = True, span: int = 0) -> None:
        self.scale, self.k, self.u, self.used, self.whole, self.span = scale, k, u, used, whole, span

    @classmethod
    def empty(cls, state: torch.Tensor, rows: int | None = None) -> "PendingCommits":
        """Nothing kept yet, room for ``rows`` (default: ``PENDING_ROWS`` for a state of at least
        ``KEEP_MIN_STATE_BYTES`` per sequence, else 0: every commit is written at once)."""
        B, H, Dk, Dv = state.shape
        rows = kept_rows(state) if rows is None else rows
        return cls(state.new_ones(B, H, 1, 1), state.new_zeros(B, H, rows, Dk), state.new_zeros(B, H, rows, Dv))

    @property
    def room(self) -> int:
        """Rows that can still be added before the state must be written."""
        return self.k.shape[2] - self.used

    def add(self, decay: torch.Tensor, k: torch.Tensor, u: torch.Tensor) -> None:
        """Commit ``S <- decay * S + k^T u``: ``decay`` [B, H, 1, 1], ``k`` [B, H, T, Dk], ``u`` [B, H, T, Dv]."""
        T = k.shape[2]
        if T > self.room:
            raise RuntimeError(f"{T} rows do not fit the {self.room} left: settle the state first")
        self.scale.mul_(decay)
        if self.used:
            self.k[:, :, :self.used].mul_(decay)
        self.k[:, :, self.used:self.used + T] = k
        self.u[:, :, self.used:self.used + T] = u
        self.used += T
        if not precision.DENORMALS_FLUSHED[0]:
            # Decayed to nothing: zero, not denormal (every operation on a denormal takes an x86 slow path; a
            # random 0.75B model's verify round of 8 sequences without flushing: 1.10x the time of one that
            # writes the states at once, 1.02x with this).
            kept = self.k[:, :, :self.used]
            kept.masked_fill_(kept.abs() < TINY, 0.0)
            self.scale.masked_fill_(self.scale < TINY, 0.0)
        self.span = self.k.shape[0]

    def read(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """x^T S for rows ``x`` [B, H, R, Dk] against the committed state S: [B, H, R, Dv]."""
        out = bmm4(x, state)
        if torch.compiler.is_compiling() or READ_ALL[0]:
            # Every row, kept or not (zero keys past ``used``: the same sum): a graph that depends on ``used``
            # would be compiled again for each count.
            k, u = self.k, self.u
        elif not self.used:
            return out  # (scale is 1 whenever no rows are kept)
        else:
            k, u = self.k[:, :, :self.used], self.u[:, :, :self.used]
        return torch.addcmul(bmm4(bmm4(x, k.transpose(-1, -2)), u), out, self.scale)

    def state(self, state: torch.Tensor) -> torch.Tensor:
        """The committed state as a new tensor (``state`` untouched)."""
        used = self.used
        return write_update(state.clone(), self.k.shape[0], self.scale, self.k[:, :, :used], self.u[:, :, :used])

    def commit(self, state: torch.Tensor, decay: torch.Tensor, k: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``add``, writing the kept rows first when there is no room for these; more rows than the update holds
        (a prefill's drafting rows) are written straight into the state. Returns the state tensor."""
        if k.shape[2] > self.room:
            state = self.settle(state)
            if k.shape[2] > self.room:
                return write_update(state, k.shape[0], decay, k, u)
        self.add(decay, k, u)
        return state

    def settle(self, state: torch.Tensor) -> torch.Tensor:
        """Write the kept commits into ``state`` (in place when it is contiguous) and return it; nothing is kept
        after. ``state`` must be the tensor this update belongs to (the state of the same sequences)."""
        if not self.used:
            return state
        if not self.whole:
            raise RuntimeError("the first sequences of a batch cannot write their kept commits alone: settle the "
                               "whole batch's cache first")
        used, span = self.used, self.span
        state = write_update(state, span, self.scale[:span], self.k[:span, :, :used], self.u[:span, :, :used])
        self.scale[:span].fill_(1.0)
        self.k[:span, :, :used].zero_()
        self.used = self.span = 0
        return state

    def clear(self, rows: torch.Tensor) -> None:
        """Forget the kept commits of sequences ``rows`` (their state is being emptied)."""
        self.scale.index_fill_(0, rows, 1.0)
        self.k.index_fill_(0, rows, 0.0)  # (rows of k are zero wherever nothing is kept)

    def narrow(self, n: int) -> "PendingCommits":
        """The first ``n`` sequences, as views (commits added to them land here; ``used`` is taken back by the
        caller, as ``ModelCache.absorb`` does)."""
        return PendingCommits(self.scale[:n], self.k[:n], self.u[:n], self.used,
                              self.whole and n == self.k.shape[0], min(self.span, n))

    def absorb(self, part: "PendingCommits") -> None:
        """Take back what a ``narrow`` view of this update added (its rows were written here already)."""
        self.used, self.span = part.used, max(self.span, part.span)

    def clone(self) -> "PendingCommits":
        return PendingCommits(self.scale.clone(), self.k.clone(), self.u.clone(), self.used, self.whole, self.span)


def kept_rows(state: torch.Tensor) -> int:
    """Rows of commits a recurrent state [B, H, Dk, Dv] keeps: ``PENDING_ROWS`` for a state of at least
    ``KEEP_MIN_STATE_BYTES`` per sequence, else 0 (every commit is written at once)."""
    return PENDING_ROWS if state[0].numel() * state.element_size() >= KEEP_MIN_STATE_BYTES else 0


def bmm4(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for [B, H, m, k] and [B, H, k, n] as one ``bmm`` over B * H (``matmul`` on 4-d operands copies
    those that are not contiguous, e.g. a transposed slice, and dispatches a few more ops: a decode step is
    priced in op dispatches)."""
    B, H = a.shape[:2]
    return torch.bmm(a.reshape(B * H, *a.shape[2:]), b.reshape(B * H, *b.shape[2:])).view(B, H, a.shape[2], b.shape[3])


def write_update(state: torch.Tensor, span: int, scale: torch.Tensor, k: torch.Tensor,
                 u: torch.Tensor) -> torch.Tensor:
    """``S <- scale * S + k^T u`` for the first ``span`` sequences of ``state``, in place (in a contiguous copy
    when it is not; returned): ``scale`` [span, H, 1, 1], ``k`` [span, H, T, Dk], ``u`` [span, H, T, Dv]."""
    B, (H, Dk, Dv), T = span, state.shape[1:], k.shape[2]
    state = state.contiguous()
    s = state[:B].view(B * H, Dk, Dv)
    kt, uf, sc = k.reshape(B * H, T, Dk).transpose(1, 2), u.reshape(B * H, T, Dv), scale.reshape(B * H, 1, 1)
    if s.device.type != "cpu" or B * H * s[0].numel() * s.element_size() <= STATE_CHUNK_BYTES:
        s.mul_(sc).baddbmm_(kt, uf)  # one piece (a GPU has no use for cache-sized ones: two launches, not 2n)
        return state
    step = max(1, STATE_CHUNK_BYTES // (s[0].numel() * s.element_size()))
    for i in range(0, B * H, step):
        s[i:i + step].mul_(sc[i:i + step]).baddbmm_(kt[i:i + step], uf[i:i + step])
    return state


@contextlib.contextmanager
def reading_all():
    """``PendingCommits.read`` over every row while inside (``READ_ALL``)."""
    before, READ_ALL[0] = READ_ALL[0], True
    try:
        yield
    finally:
        READ_ALL[0] = before
