"""Rows picked per sequence: ``x.gather(1, index[..., None].expand(..., C))`` as one row copy each.

A gather along the rows with an index expanded over the channels reads one int64 index per element it copies:
on the CPU, 64 rows of 6,144 fp32 channels (a tree conv's windows at one sequence) took 273 us that way and
46 us as an ``index_select`` of whole rows from the flattened batch (8 sequences x 7 rows: 951 vs 190 us).
"""

from __future__ import annotations

import torch


def take_rows(x_BLC: torch.Tensor, index_BT: torch.Tensor) -> torch.Tensor:
    """Row ``index[b, t]`` of sequence b, ``[B, T, C]`` (``index`` any shape ``[B, ...]``: the result has that
    shape plus C). Indices must lie in ``[0, L)``; equal to the gather above, gradients included."""
    if index_BT.shape[0] != x_BLC.shape[0]:
        raise ValueError(f"index has {index_BT.shape[0]} sequences, x has {x_BLC.shape[0]}")
    return take_flat(x_BLC, row_index(index_BT, x_BLC.shape[1]))


def row_index(index_BT: torch.Tensor, L: int) -> torch.Tensor:
    """``index`` [B, ...] into rows of sequences of ``L`` rows, as indices into their ``B * L`` rows (made once,
    ``take_flat`` takes the rows of any tensor of that layout)."""
    B = index_BT.shape[0]
    return index_BT + torch.arange(0, B * L, L, device=index_BT.device).view(B, *[1] * (index_BT.dim() - 1))


def take_flat(x_BLC: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``take_rows`` with the index from ``row_index``: [*flat.shape, C]."""
    B, L, C = x_BLC.shape
    return x_BLC.reshape(B * L, C).index_select(0, flat.reshape(-1)).view(*flat.shape, C)
