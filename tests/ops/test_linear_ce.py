"""The chunked linear + cross-entropy: the value and gradients of full logits, without holding them."""

from __future__ import annotations

import pytest
import torch

from flare.config import ModelConfig
from flare.data import PackedBatch
from flare.model import FlareModel
from flare.objective import FlareObjective, ObjectiveConfig
from flare.objective import loss as loss_module
from flare.ops.linear_ce import (
    CHUNK_BYTES,
    linear_cross_entropy_reference,
    linear_cross_entropy_sum,
    linear_cross_entropy_sums,
    slab_columns,
)

MASK = 95


def _data(N, V, E, dtype, seed=0, masked_id=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, E, generator=g, dtype=dtype)
    weight = torch.randn(V, E, generator=g, dtype=dtype) / E**0.5
    targets = torch.randint(0, V, (N,), generator=g)
    if masked_id is not None:  # the [MASK] token is never a target (its logit is -inf)
        targets = torch.where(targets == masked_id, (masked_id + 1) % V, targets)
    return hidden, weight, targets


def _value_and_grads(fn, hidden, weight, targets, scale=1.0, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, targets, **kw)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def _close(got, want, rtol):
    """Equal within ``rtol`` of the reference's largest magnitude (a norm-wise relative bound)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    size = want.double().abs().max().item() if want.numel() else 0.0
    assert err <= rtol * size, (err, size)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("masked_id", [None, 3])
@pytest.mark.parametrize("N, chunk, columns", [(37, 5, None), (37, 1, 7), (7, 64, 53), (1, 1, 1), (37, 8192, 10),
                                              (16, 8, 4), (16, 16, 52)])
def test_equals_full_logits(N, chunk, columns, masked_id, dtype, rtol):
    # Row blocks that do not divide N, vocabulary slabs that do not divide V (53), slabs of one column.
    hidden, weight, targets = _data(N, 53, 8, dtype, seed=N, masked_id=masked_id)
    got = _value_and_grads(linear_cross_entropy_sum, hidden, weight, targets, 0.7, masked_id=masked_id,
                           chunk_rows=chunk, columns=columns)
    want = _value_and_grads(linear_cross_entropy_reference, hidden, weight, targets, 0.7, masked_id=masked_id)
    assert got[0].dtype == dtype and got[0].ndim == 0
    assert abs(got[0].item() - want[0].item()) <= rtol * abs(want[0].item())
    for g, w in zip(got[1:], want[1:]):
        _close(g, w, rtol)
    if masked_id is not None:  # the [MASK] row of the head is never pushed towards or away from anything
        assert not got[2][masked_id].any()


def test_one_chunk_is_the_full_logits_path():
    # One chunk computes what the reference computes, by other kernels (log-sum-exp minus the target's logit;
    # softmax minus one-hot): equal to rounding.
    hidden, weight, targets = _data(37, 53, 8, torch.float32, seed=1, masked_id=3)
    got = _value_and_grads(linear_cross_entropy_sum, hidden, weight, targets, 0.3, masked_id=3, chunk_rows=37)
    want = _value_and_grads(linear_cross_entropy_reference, hidden, weight, targets, 0.3, masked_id=3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_no_rows_is_a_zero_in_the_graph():
    hidden, weight, targets = _data(0, 11, 4, torch.float32)
    loss, gh, gw = _value_and_grads(linear_cross_entropy_sum, hidden, weight, targets, chunk_rows=3, masked_id=2)
    assert loss.item() == 0.0 and gh.shape == (0, 4)
    assert gw.shape == weight.shape and not gw.any()


def test_ignored_targets_count_for_nothing():
    hidden, weight, targets = _data(9, 13, 4, torch.float64, seed=2)
    targets[[0, 4, 8]] = -100
    got = _value_and_grads(linear_cross_entropy_sum, hidden, weight, targets, chunk_rows=2)
    want = _value_and_grads(linear_cross_entropy_reference, hidden, weight, targets)
    for g, w in zip(got, want):
        _close(g, w, 1e-12)
    assert not got[1][[0, 4, 8]].any()


def test_bf16_autocast_matches_the_reference_under_the_same_autocast():
    hidden, weight, targets = _data(37, 53, 16, torch.float32, seed=3, masked_id=5)
    results = []
    for fn, kw in ((linear_cross_entropy_sum, {"chunk_rows": 6, "columns": 9}), (linear_cross_entropy_reference, {})):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w, targets, masked_id=5, **kw)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    (loss, gh, gw), (want, wh, ww) = results
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float32
    assert abs(loss.item() - want.item()) <= 1e-2 * abs(want.item())
    _close(gh, wh, 3e-2)
    _close(gw, ww, 3e-2)
    # The matmul really ran in bf16: the fp32 value differs from it by more than fp32 round-off.
    fp32 = linear_cross_entropy_sum(hidden, weight, targets, masked_id=5, chunk_rows=6)
    assert abs(fp32.item() - loss.item()) > 1e-5 * abs(fp32.item())


def test_nothing_of_size_rows_times_vocab_is_saved():
    N, V, E = 37, 53, 8
    hidden, weight, targets = _data(N, V, E, torch.float32)

    def saved_sizes(fn, **kw):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(h, w, targets, **kw)
        return sizes

    assert max(saved_sizes(linear_cross_entropy_reference)) >= N * V  # the check sees full logits where they are
    sizes = saved_sizes(linear_cross_entropy_sum, chunk_rows=4, masked_id=1)
    # hidden, weight, targets, their groups and each row's log-sum-exp: backward recomputes the rest
    assert sorted(sizes) == sorted([N * E, V * E, N, N, N])


def test_groups_sum_like_separate_calls():
    hidden, weight, targets = _data(29, 41, 8, torch.float32, seed=4, masked_id=2)
    groups = torch.randint(0, 3, (29,), generator=torch.Generator().manual_seed(5))
    groups[:3] = torch.tensor([0, 1, 2])
    scale = torch.tensor([0.5, -1.0, 2.0])
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    sums = linear_cross_entropy_sums(h, w, targets, groups, 3, masked_id=2, chunk_rows=4, columns=6)
    (sums * scale).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = torch.stack([linear_cross_entropy_reference(h2[groups == g], w2, targets[groups == g], masked_id=2)
                        for g in range(3)])
    (want * scale).sum().backward()
    torch.testing.assert_close(sums, want.detach(), rtol=1e-5, atol=1e-6)
    _close(h.grad, h2.grad, 1e-5)
    _close(w.grad, w2.grad, 1e-5)
    with pytest.raises(ValueError, match="groups"):
        linear_cross_entropy_sums(hidden, weight, targets, groups[:-1], 3)


def test_default_tile_fits_the_budget():
    assert slab_columns(8192, 248_320) == CHUNK_BYTES // (4 * 8192)
    assert slab_columns(10, 248_320) == 248_320 and slab_columns(10**12, 5) == 1
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy_sum(*_data(3, 5, 2, torch.float32), chunk_rows=0)
    with pytest.raises(ValueError, match="columns"):
        linear_cross_entropy_sum(*_data(3, 5, 2, torch.float32), columns=0)


# --- Through the objective: the FLARE, block-diffusion and AR losses of a tiny model, tied and untied ----------


def _model(tied: bool) -> FlareModel:
    config = ModelConfig.new_hybrid(vocab_size=96, hidden_size=32, num_hidden_layers=2, intermediate_size=48,
                                    head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8,
                                    full_attention_interval=2, tie_word_embeddings=tied)
    config.mask_token_id = MASK
    model = FlareModel(config).init_weights(seed=1, std=0.2)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def _batch() -> PackedBatch:
    """Two rows of two block-aligned documents (block size 4): a prompt, then a supervised response."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 90, (2, 16), generator=g)
    loss_mask = torch.tensor([[False] * 3 + [True] * 5 + [False] * 2 + [True] * 6] * 2)
    docs = torch.tensor([[0] * 8 + [1] * 8] * 2)
    return PackedBatch(ids, loss_mask, docs)


def _old_path(hidden, weight, targets, groups, num_groups, *, masked_id=None):
    """The loss as it was: full logits of each group's rows, one call per group."""
    return torch.stack([linear_cross_entropy_reference(hidden[groups == g], weight, targets[groups == g],
                                                       masked_id=masked_id) for g in range(num_groups)])


def _chunked(hidden, weight, targets, groups, num_groups, *, masked_id=None):
    return linear_cross_entropy_sums(hidden, weight, targets, groups, num_groups, masked_id=masked_id, chunk_rows=3,
                                     columns=17)


@pytest.mark.parametrize("kind", ["flare", "block_diffusion", "ar"])
@pytest.mark.parametrize("tied", [False, True])
def test_objective_loss_and_gradients_match_the_full_logits_path(monkeypatch, kind, tied):
    model, batch = _model(tied), _batch()
    objective = FlareObjective(ObjectiveConfig(kind=kind, block_size=4), MASK)
    views = objective.views(batch, torch.Generator().manual_seed(2))
    results = []
    for ce in (_chunked, _old_path):
        monkeypatch.setattr(loss_module, "linear_cross_entropy_sums", ce)
        model.zero_grad(set_to_none=True)
        parts = objective.parts(model, batch, views)
        parts.loss().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((parts.sum_diff.item(), parts.sum_ar.item(), grads))
    (d1, a1, g1), (d2, a2, g2) = results
    assert (kind == "ar") == (d1 == 0.0) and (kind == "block_diffusion") == (a1 == 0.0)
    assert d1 == pytest.approx(d2, rel=1e-5) and a1 == pytest.approx(a2, rel=1e-5)
    assert g1.keys() == g2.keys() and model.lm_head.weight.grad is not None
    for name in g1:
        _close(g1[name], g2[name], 1e-5)
    if tied:  # one shared matrix: its gradient holds the head's part and the embedding's
        assert model.lm_head.weight.grad is model.model.embed_tokens.weight.grad


def test_objective_uses_the_chunked_loss_by_default(monkeypatch):
    model, batch = _model(tied=True), _batch()
    objective = FlareObjective(ObjectiveConfig(block_size=4), MASK)
    calls = []

    def spy(hidden, weight, targets, groups, num_groups, **kw):
        calls.append((weight, num_groups, kw))
        return linear_cross_entropy_sums(hidden, weight, targets, groups, num_groups, **kw)

    assert loss_module.linear_cross_entropy_sums is linear_cross_entropy_sums
    monkeypatch.setattr(loss_module, "linear_cross_entropy_sums", spy)
    objective.parts(model, batch, objective.views(batch, torch.Generator().manual_seed(3)))
    # One pass over the head for the diffusion term and the AR term together.
    assert calls == [(model.lm_head.weight, 2, {"masked_id": MASK})]


# --- The fused tile kernels (CUDA with Triton; compiled from the same functions) --------------------------------


def _fused_matches_eager(device: str, monkeypatch) -> None:
    import flare.ops.linear_ce as linear_ce

    hidden, weight, targets = (t.to(device) for t in _data(29, 53, 16, torch.float32, seed=6, masked_id=4))
    targets[3] = -100
    want = _value_and_grads(linear_cross_entropy_sum, hidden, weight, targets, 0.7, masked_id=4, chunk_rows=8,
                            columns=11)
    monkeypatch.setattr(linear_ce, "fused_available", lambda d: True)
    calls = []
    real = linear_ce.fused_kernels
    monkeypatch.setattr(linear_ce, "_kernels", lambda d: calls.append(d) or real())
    got = _value_and_grads(linear_cross_entropy_sum, hidden, weight, targets, 0.7, masked_id=4, chunk_rows=8,
                           columns=11)
    assert calls  # the compiled kernels ran
    assert abs(got[0].item() - want[0].item()) <= 1e-5 * abs(want[0].item())
    for g, w in zip(got[1:], want[1:]):
        _close(g.cpu(), w.cpu(), 1e-5)


def test_fused_tile_kernels_match_the_eager_ones_on_the_cpu(monkeypatch):
    # The same compiled functions CUDA runs, built by torch.compile's CPU backend here.
    _fused_matches_eager("cpu", monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_tile_kernels_match_the_eager_ones_on_cuda(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    _fused_matches_eager("cuda", monkeypatch)


def test_fused_kernels_are_chosen_only_on_cuda_with_triton(monkeypatch):
    import flare.ops.linear_ce as linear_ce

    assert not linear_ce.fused_available(torch.device("cpu"))
    monkeypatch.setattr(linear_ce.importlib.util, "find_spec", lambda name: object())
    assert linear_ce.fused_available(torch.device("cuda"))
    monkeypatch.setenv("FLARE_FUSED_CE", "0")
    assert not linear_ce.fused_available(torch.device("cuda"))
