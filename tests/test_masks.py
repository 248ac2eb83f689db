"""Mask predicates: hand-written truth tables, and flex-compatibility of every rule."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from flare import masks
from flare.model.context import use_flex


def test_inference_rows_padding_is_invisible():
    """Per-row clean counts: row 1 is a cold start [clean, noisy, noisy, pad] beside a warm row 0; no real row
    sees a padding slot, and a padding row sees only the real rows and itself (never an empty row)."""
    rule = masks.inference_rows(torch.tensor([0, 0]), torch.tensor([2, 1]), torch.tensor([4, 3]))
    m = masks.materialize(rule, 2, 4, 4, "cpu")[:, 0].int()
    assert m[0].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert m[1].tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    empty = masks.inference_rows(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    assert masks.materialize(empty, 1, 3, 3, "cpu")[0, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_two_stream_table():
    """method §2.1 on one row: L=4, block 2, two documents [0, 0, 1, 1], one noisy view."""
    doc = torch.tensor([[0, 0, 1, 1]])
    m = masks.materialize(masks.two_stream(doc, 2), 1, 8, 8, "cpu")[0, 0].int()
    expected = torch.tensor([
        # clean keys 0-3   noisy keys 4-7
        [1, 0, 0, 0, 0, 0, 0, 0],  # clean 0
        [1, 1, 0, 0, 0, 0, 0, 0],  # clean 1
        [0, 0, 1, 0, 0, 0, 0, 0],  # clean 2 (doc 1)
        [0, 0, 1, 1, 0, 0, 0, 0],  # clean 3
        [0, 0, 0, 0, 1, 1, 0, 0],  # noisy 0: block 0 of doc 0, no clean prefix
        [0, 0, 0, 0, 1, 1, 0, 0],  # noisy 1
        [0, 0, 0, 0, 0, 0, 1, 1],  # noisy 2: doc 1's first block, never doc 0
        [0, 0, 0, 0, 0, 0, 1, 1],  # noisy 3
    ])
    assert torch.equal(m, expected)


def test_two_stream_sees_earlier_clean_blocks_and_block_causal_variant():
    doc = torch.zeros(1, 6, dtype=torch.long)
    m = masks.materialize(masks.two_stream(doc, 2), 1, 12, 12, "cpu")[0, 0]
    assert m[6 + 4, :6].tolist() == [True, True, True, True, False, False]  # noisy block 2 <- clean blocks 0-1
    assert not m[6 + 4, 6:10].any() and m[6 + 4, 10:12].all()
    blk = masks.materialize(masks.two_stream(doc, 2, "block"), 1, 12, 12, "cpu")[0, 0]
    assert blk[0, :2].all() and not blk[0, 2:].any()  # clean row 0 sees its whole block


def test_two_views_never_see_each_other():
    doc = torch.zeros(1, 4, dtype=torch.long)
    m = masks.materialize(masks.two_stream(doc, 4), 1, 12, 12, "cpu")[0, 0]
    assert m[4:8, 4:8].all() and not m[4:8, 8:12].any() and not m[8:12, 4:8].any() and m[8:12, 8:12].all()


def test_inference_rows_table():
    """2 committed tokens, then rows [clean, clean, noisy, noisy] in slots 2-5, one stale slot after them."""
    rule = masks.inference_rows(torch.tensor([2]), torch.tensor([2]), torch.tensor([4]))
    m = masks.materialize(rule, 1, 4, 7, "cpu")[0, 0].int()
    expected = torch.tensor([
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 0],
    ])
    assert torch.equal(m, expected)


RULES = {
    "causal_from": (lambda: masks.causal_from(torch.tensor([3, 0])), 2, 4, 7),
    "inference_rows": (lambda: masks.inference_rows(torch.tensor([3, 1]), torch.tensor([2, 1]),
                                                    torch.tensor([5, 3])), 2, 5, 9),
    "packed_causal": (lambda: masks.packed_causal(torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])), 2, 5, 5),
    "two_stream": (lambda: masks.two_stream(torch.tensor([[0, 0, 0, 1, 1, 1]]), 3), 1, 18, 18),
}


@pytest.mark.parametrize("name", RULES)
def test_rules_are_flex_compatible(name):
    """flex attention's own (vmapped) materialisation agrees with ours, so the rule compiles to a BlockMask."""
    make, B, Tq, Tk = RULES[name]
    rule = make()
    assert torch.equal(create_mask(rule, B, None, Tq, Tk, device="cpu"), masks.materialize(rule, B, Tq, Tk, "cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention path needs a CUDA device")
def test_flex_path_matches_sdpa_on_gpu():
    from flare.ops.attention import attention

    assert use_flex("cuda")
    doc = torch.tensor([[0] * 96 + [1] * 160], device="cuda")
    rule = masks.two_stream(doc, 4)
    q, k, v = (torch.randn(1, 512, 4, 64, device="cuda") for _ in range(3))
    dense = attention(q, k, v, masks.materialize(rule, 1, 512, 512, "cuda"), 0.125)
    flex = attention(q, k, v, masks.block_mask(rule, 1, 512, 512, "cuda"), 0.125)
    assert (dense - flex).abs().max() < 1e-3


def test_flex_is_not_used_on_cpu():
    assert not use_flex("cpu")
