"""RoPE from the kept table == RoPE computed directly; slots written from a shared range == slots written
per sequence."""

from __future__ import annotations

import pytest
import torch

from flare.model.layers import rotary


def direct_rope(x: torch.Tensor, positions: torch.Tensor, R: int, theta: float) -> torch.Tensor:
    """The textbook partial rotate-half RoPE, in float64: the first R dims of each head rotated, the rest kept."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, R, 2, dtype=torch.float64) / R))
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [B, T, R/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, :, None], torch.cat([angles.sin()] * 2, -1)[:, :, None]
    x_rot, rest = x[..., :R].double(), x[..., R:].double()
    rotated = torch.cat([-x_rot[..., R // 2:], x_rot[..., : R // 2]], -1)
    return torch.cat([x_rot * cos + rotated * sin, rest], -1)


@pytest.mark.parametrize("R,D", [(16, 16), (4, 16), (8, 24)])
def test_table_rope_matches_direct_at_any_position(R, D):
    gen = torch.Generator().manual_seed(R + D)
    x = torch.randn(3, 5, 2, D, generator=gen, dtype=torch.float64)
    # Positions far past the first table (256 rows) make it grow; a repeat must reuse the grown table.
    positions = torch.tensor([[0, 1, 2, 3, 4], [250, 255, 256, 257, 300], [1000, 1500, 2047, 2048, 4095]])
    for _ in range(2):
        rot = rotary(positions, R, D, 10_000.0, torch.float64, "cpu", limit=4096)
        assert rot.cos.shape == (3, 5, 1, D)
        torch.testing.assert_close(rot.apply(x), direct_rope(x, positions, R, 10_000.0), rtol=0, atol=1e-12)
    # A shared range of positions gives [1, T, 1, D] and the same rotation for every sequence.
    shared = rotary(range(700, 705), R, D, 10_000.0, torch.float64, "cpu", limit=705)
    assert shared.cos.shape == (1, 5, 1, D)
    expect = direct_rope(x, torch.arange(700, 705).expand(3, 5), R, 10_000.0)
    torch.testing.assert_close(shared.apply(x), expect, rtol=0, atol=1e-12)


def test_low_precision_table_is_the_cast_of_the_fp32_one():
    pos = torch.arange(40)[None]
    hi = rotary(pos, 8, 16, 1e6, torch.float32, "cpu", limit=40)
    lo = rotary(pos, 8, 16, 1e6, torch.bfloat16, "cpu", limit=40)
    assert lo.cos.dtype == torch.bfloat16
    assert torch.equal(lo.cos, hi.cos.bfloat16()) and torch.equal(lo.sin, hi.sin.bfloat16())


@pytest.mark.parametrize("width", [1, 3])
def test_writing_at_a_shared_range_equals_writing_per_sequence(tiny_models, width):
    """With every length equal to the bound, a forward writes its slots from a range (no index tensors); the
    same forward on a cache that does not know the lengths are equal writes them per sequence. Same outputs,
    same caches."""
    model = tiny_models["qwen3_5"][0]
    ids = torch.randint(0, model.config.vocab_size, (3, 9 + width))
    with torch.no_grad():
        fast = model.new_cache(3)
        model(ids[:, :9], cache=fast)
        slow = fast.clone()
        assert fast.bound_exact
        slow.bound_exact = False
        out_fast = model(ids[:, 9:], cache=fast)
        out_slow = model(ids[:, 9:], cache=slow)
    assert torch.equal(out_fast, out_slow)
    for a, b in zip(fast.layers, slow.layers):
        for name, value in vars(a).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, getattr(b, name)), name
    assert fast.lengths.tolist() == slow.lengths.tolist() == [9 + width] * 3


def test_a_dry_run_leaves_no_fake_tensor_in_the_kept_tables():
    """``flare train --dry-run`` runs the model on fake tensors; the RoPE tables and constants kept between
    forwards must come out real afterwards (a fake one broke the next real forward in the same process)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from flare.ops.precision import constant

    args = (range(0, 5), 8, 16, 12_345.0, torch.float32, "cpu")
    with FakeTensorMode():
        assert isinstance(rotary(*args, limit=5).cos, FakeTensor)
        assert isinstance(constant(0.321, torch.float32, torch.device("cpu")), FakeTensor)
    assert not isinstance(rotary(*args, limit=5).cos, FakeTensor)
    assert not isinstance(constant(0.321, torch.float32, torch.device("cpu")), FakeTensor)
