"""Softmax attention with an explicit mask: the SDPA path (dense boolean mask, CPU and GPU) and the flex path
(a BlockMask compiled from the same predicate, GPU), behind one signature.

On the CPU a decoding forward's few query rows per head go to SDPA with each key/value head's query heads folded
into its rows (``fold_groups``): torch's CPU kernel splits the work into tasks of one sequence, one query head
and a block of query rows, each reading its key/value head whole, so with one or a few query rows a task is
mostly fixed cost (most of all in bf16). Folded, a task covers a key/value head's r query heads at once
(measured on an AVX-512-BF16 EPYC, 2 threads, bf16, one query row, 64 / 512 keys: 8 sequences, 8 heads on 2 of
256 dims 898 -> 105 / 7,074 -> 588 us; 9 heads on 3 of 64 dims 305 -> 76 / 2,098 -> 360 us; at 2,048 keys and
the first shape 30.3 -> 3.4 ms; 7 rows 1.2-2x faster; ``benchmarks/bench_attention.py``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


# Query rows per sequence up to which the CPU folds query heads into rows: decoding steps and rows forwards (up to
# a tree round at N = 4, 20 rows: ``flare.decoding.groups``); at 32 rows the two are even, and prefills stay.
FOLD_MAX_ROWS = 20
# fp32 single query rows are folded from this many keys x head dims (``fold_groups``).
FP32_FOLD_MIN_KEYS_DIMS = 2**17


FLEX, FOLDED, SDPA = "flex", "sdpa_folded", "sdpa"


def attention(
    q_BTHD: torch.Tensor,
    k_BSGD: torch.Tensor,
    v_BSGD: torch.Tensor,
    mask,
    scale: float,
) -> torch.Tensor:
    """Grouped-query attention. ``mask``: a boolean [B, 1, T, S] tensor (True = visible), a flex-attention
    BlockMask, or None for plain causal with S == T. Returns [B, T, H, D]; H must be a multiple of G."""
    q, k, v = (x.transpose(1, 2) for x in (q_BTHD, k_BSGD, v_BSGD))
    path = _path(q, k, mask)
    every_key = isinstance(mask, str)  # masks.ALL_VISIBLE
    if path == FLEX:
        out = _flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
    elif path == FOLDED:
        out = folded_sdpa(q, k, v, None if every_key else mask, scale)
    elif every_key:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    else:
        out = masked_sdpa(q, k, v, mask, scale, expand_kv=q.is_cuda and mask is not None)
    return out.transpose(1, 2)


def attention_path(q_BTHD: torch.Tensor, k_BSGD: torch.Tensor, mask) -> str:
    """The kernel path ``attention`` takes for these operands: ``flex`` (a BlockMask), ``sdpa_folded`` (query
    heads folded into rows, ``fold_groups``) or ``sdpa``."""
    return _path(q_BTHD.transpose(1, 2), k_BSGD.transpose(1, 2), mask)


def _path(q: torch.Tensor, k: torch.Tensor, mask) -> str:
    if mask is not None and not isinstance(mask, (str, torch.Tensor)):
        return FLEX
    return FOLDED if mask is not None and fold_groups(q, k) else SDPA


def fold_groups(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``attention`` folds each key/value head's query heads into its query rows (``folded_sdpa``): on
    the CPU, for grouped heads and at most ``FOLD_MAX_ROWS`` query rows; in fp32 at one row only over at least
    ``FP32_FOLD_MIN_KEYS_DIMS`` keys x head dims (torch's kernel runs fp32 single rows well, and below that the
    fold's copies cost more than it saves: 8 sequences of 4 heads on 2 of 32 dims, 64 keys, 21 -> 48 us; 8 heads
    on 2 of 256 dims, 512 keys, 944 -> 595 us)."""
    T, S, D = q.shape[2], k.shape[2], k.shape[3]
    return (q.device.type == "cpu" and q.shape[1] > k.shape[1] and T <= FOLD_MAX_ROWS
            and not (T == 1 and q.dtype == torch.float32 and S * D < FP32_FOLD_MIN_KEYS_DIMS))


def folded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scale: float) -> torch.Tensor:
    """SDPA over [B, H, T, D] queries and [B, G, S, D] keys/values, the r = H / G query heads of each key/value
    head run as r x T rows of one head (a boolean mask [B, 1, T, S] repeated over them, or one ``fold_mask``
    made already; None: every key visible). Every query row is computed as in the grouped call; returns
    [B, H, T, D]."""
    B, H, T, D = q.shape
    G = k.shape[1]
    r = H // G
    rows = q.reshape(B, G, r * T, D)
    if mask is not None and mask.dtype == torch.bool:
        mask = fold_mask(mask, r, q.dtype)
    out = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=scale)
    return out.view(B, H, T, D)


def fold_mask(mask: torch.Tensor, r: int, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask [B, 1, T, S] as ``folded_sdpa`` hands it to SDPA for r query heads a key/value head: repeated
    over them, [B, 1, r * T, S], and additive in the queries' dtype (0 visible, -inf hidden: SDPA's own reading
    of a boolean mask). A forward's attention layers share one (``ForwardContext.folded_mask``): made per layer,
    it was a copy and a conversion of the mask in each (five small ops, 30 layers on SmolLM2)."""
    B, _, T, S = mask.shape
    rows = mask[:, :, None].expand(B, 1, r, T, S).reshape(B, 1, r * T, S)
    return torch.full(rows.shape, float("-inf"), dtype=dtype, device=mask.device).masked_fill_(rows, 0.0)


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                expand_kv: bool) -> torch.Tensor:
    """SDPA over [B, H, T, D] queries and [B, G, S, D] keys/values. With ``expand_kv`` the G key/value heads are
    repeated to H first: on CUDA no fused kernel takes both a mask and grouped heads, and the math fallback
    would materialise every score in fp32, while the memory-efficient kernel takes a mask over full heads."""
    if expand_kv and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


@functools.lru_cache(maxsize=1)
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@torch.library.custom_op("flare::span_attention", mutates_args=())
def span_attention(q_BTHD: torch.Tensor, k_BSGD: torch.Tensor, v_BSGD: torch.Tensor, mask: torch.Tensor,
                   span: torch.Tensor, scale: float) -> torch.Tensor:
    """``attention`` over the first ``span`` (a one-element CPU tensor) of the S key slots and mask columns: in a
    forward compiled for a cache's whole capacity (``FLARE_COMPILE=static``), where the slots past the longest
    sequence's are masked for every row, an op the compiler keeps opaque, so the graph's shapes stay static while
    the work follows the lengths (SmolLM2, 8 sequences, 1,024 slots: the whole capacity read every step made a
    static step slower than eager)."""
    n = int(span)
    return attention(q_BTHD, k_BSGD[:, :n], v_BSGD[:, :n], mask[..., :n], scale).contiguous()


@span_attention.register_fake
def _(q_BTHD, k_BSGD, v_BSGD, mask, span, scale):
    return torch.empty_like(q_BTHD, memory_format=torch.contiguous_format)
