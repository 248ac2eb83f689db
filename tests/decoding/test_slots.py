"""SlotBatch: what emitting tokens records, and where an output ends among them."""

from __future__ import annotations

import torch

from flare.decoding import SamplingParams
from flare.decoding.slots import SlotBatch


def _slots(*limits: tuple[int, list[int]]) -> SlotBatch:
    slots = SlotBatch(len(limits), "cpu")
    for i, (max_new, stops) in enumerate(limits):
        slots.admit(i, SamplingParams(temperature=0, max_new_tokens=max_new), stops, None, room=4)
    return slots


def test_emit_says_which_token_ended_each_output():
    """The index of the stop token or of the token that reached max_new, among the kept ones; K where none did
    (a stop token past n_emit does not count, nor one of another slot's stops)."""
    slots = _slots((10, [7]), (3, []), (10, [7]), (10, [9]), (10, [7]))
    slots.out_len[1] = 1  # two more tokens reach its limit
    tokens = torch.tensor([[1, 7, 2, 7], [1, 2, 3, 4], [1, 2, 3, 7], [7, 7, 7, 7], [1, 2, 3, 4]])
    end = slots.emit(tokens, torch.tensor([4, 4, 3, 4, 0]), ends=True)
    assert end.tolist() == [1, 1, 4, 4, 4]
    assert slots.finished.tolist() == [True, True, False, False, False]
    assert slots.out_len.tolist() == [4, 5, 3, 4, 0]
    assert slots.emit(tokens, torch.zeros(5, dtype=torch.long)) is None  # not asked: nothing more is computed
