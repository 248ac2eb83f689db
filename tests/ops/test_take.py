"""take_rows == the row gather it replaces, values and gradients, over awkward shapes."""

import pytest
import torch

from flare.ops.take import take_rows


@pytest.mark.parametrize("B,L,C,idx_shape", [(1, 1, 1, (1, 1)), (3, 5, 7, (3, 4)), (2, 9, 130, (2, 3, 4)),
                                             (4, 2, 3, (4, 0))])
def test_take_rows_matches_gather(B, L, C, idx_shape):
    g = torch.Generator().manual_seed(B * 100 + L)
    x = torch.randn(B, L, C, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, L, idx_shape, generator=g)
    flat = idx.reshape(B, -1)
    want = x.gather(1, flat[:, :, None].expand(B, flat.shape[1], C)).view(*idx_shape, C)
    got = take_rows(x, idx)
    assert torch.equal(got, want)
    w = torch.randn_like(want)
    gx_want, = torch.autograd.grad((want * w).sum(), x)
    gx_got, = torch.autograd.grad((got * w).sum(), x)
    torch.testing.assert_close(gx_got, gx_want)


def test_take_rows_non_contiguous_input():
    x = torch.randn(5, 3, 4).transpose(0, 1)  # [3, 5, 4], not contiguous
    idx = torch.tensor([[4, 0], [1, 1], [2, 3]])
    assert torch.equal(take_rows(x, idx), x.gather(1, idx[:, :, None].expand(3, 2, 4)))


def test_take_rows_refuses_a_batch_mismatch():
    with pytest.raises(ValueError, match="sequences"):
        take_rows(torch.zeros(2, 3, 4), torch.zeros(3, 1, dtype=torch.long))
