"""The FLARE objective: noise, complementary views, the token-equal loss, shared vs doubled clean stream."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from flare.data import PackedBatch
from flare.objective import FlareObjective, ObjectiveConfig, sample_views
from flare.objective.noise import antithetic_rates

MASK = 95


def _batch(block_size: int = 3, seed: int = 0) -> PackedBatch:
    """Two rows, each with two documents (prompt then response), documents padded to the block size."""
    g = torch.Generator().manual_seed(seed)
    rows, masks, docs = [], [], []
    for _ in range(2):
        ids, lm, dd = [], [], []
        for d, (prompt, response) in enumerate([(4, 7), (2, 9)]):
            n = prompt + response
            n_pad = -(-n // block_size) * block_size - n
            ids += torch.randint(0, 90, (n + n_pad,), generator=g).tolist()
            lm += [False] * prompt + [True] * response + [False] * n_pad
            dd += [d] * (n + n_pad)
        rows.append(ids), masks.append(lm), docs.append(dd)
    return PackedBatch(torch.tensor(rows), torch.tensor(masks), torch.tensor(docs))


def test_views_partition_the_supervised_positions():
    batch = _batch()
    views = sample_views(batch, 3, MASK, generator=torch.Generator().manual_seed(1))
    first, second = views.masked[:, 0], views.masked[:, 1]
    assert not (first & second).any()
    assert torch.equal(first | second, batch.loss_mask)  # each supervised position masked exactly once
    assert not (views.masked & ~batch.loss_mask[:, None]).any()  # prompt and padding never masked
    assert torch.equal(views.xt == MASK, views.masked | (batch.input_ids[:, None] == MASK))


def test_rates_are_stratified_and_per_block():
    t = antithetic_rates(64, torch.Generator().manual_seed(0))
    assert torch.equal((t.sort().values * 64).floor().long(), torch.arange(64))
    batch = _batch(block_size=3)
    views = sample_views(batch, 3, MASK, complementary=False, generator=torch.Generator().manual_seed(2))
    assert views.masked.shape[1] == 1 and views.rates.shape == (2, -(-batch.input_ids.shape[1] // 3))


def _manual_loss(model, batch, views, w):
    """The loss written out from full logits of a two-stream forward, one row per view."""
    B, V, L = views.xt.shape
    nxt = torch.cat([batch.input_ids[:, 1:], torch.zeros_like(batch.input_ids[:, :1])], 1)
    ok = batch.next_target_ok
    diff_terms, ar_terms = [], []
    for v in range(V):
        clean, noisy = model.two_stream_hidden(batch.input_ids, views.xt[:, v : v + 1], batch.doc_ids, 3)
        lc, ln = model.logits(clean), model.logits(noisy[:, 0])
        for b in range(B):
            for i in range(L):
                if ok[b, i] and views.masked[b, v, i]:
                    diff_terms.append(F.cross_entropy(ln[b, i][None], nxt[b, i][None]))
                if ok[b, i] and v == 0:
                    ar_terms.append(F.cross_entropy(lc[b, i][None], nxt[b, i][None]))
    return torch.stack(diff_terms).mean() + w * torch.stack(ar_terms).mean(), len(diff_terms), len(ar_terms)


def test_loss_equals_the_written_out_definition(tiny_models):
    model = copy.deepcopy(tiny_models["qwen3_5"][0]).double()
    batch = _batch()
    views = sample_views(batch, 3, MASK, generator=torch.Generator().manual_seed(3))
    loss, metrics = FlareObjective(ObjectiveConfig(), MASK).loss_from_views(model, batch, views)
    want, n_diff, n_ar = _manual_loss(model, batch, views, 1.0)
    assert abs(loss.item() - want.item()) <= 1e-10
    assert metrics["diff_tokens"] == n_diff and metrics["ar_tokens"] == n_ar
    # Token-equal: each AR target is also a diffusion target, except where its row is not maskable (the first
    # response token, predicted from the last prompt token).
    assert n_ar - n_diff == 2 * 2


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_shared_clean_stream_equals_batch_doubling(tiny_models, family):
    model = copy.deepcopy(tiny_models[family][0]).double()
    batch = _batch()
    views = sample_views(batch, 3, MASK, generator=torch.Generator().manual_seed(4))
    grads = []
    for share in (True, False):
        model.zero_grad()
        loss, _ = FlareObjective(ObjectiveConfig(share_clean=share), MASK).loss_from_views(model, batch, views)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = grads
    assert abs(l1 - l2) <= 1e-12
    for name in g1:
        assert (g1[name] - g2[name]).abs().max() <= 1e-10 * max(1.0, g1[name].abs().max().item()), name


def test_block_diffusion_ablation_has_no_ar_term(tiny_models):
    model = tiny_models["qwen3_5"][0]
    batch = _batch()
    views = sample_views(batch, 3, MASK, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, flare_m = FlareObjective(ObjectiveConfig(), MASK).loss_from_views(model, batch, views)
        loss, bd = FlareObjective(ObjectiveConfig(kind="block_diffusion"), MASK).loss_from_views(model, batch, views)
        _, w0 = FlareObjective(ObjectiveConfig(ar_loss_weight=0.0), MASK).loss_from_views(model, batch, views)
    assert bd["ar_tokens"] == 0 and loss.item() == pytest.approx(bd["loss_diff"], rel=1e-6)
    # The block-causal clean stream changes what noisy rows read, so the diffusion loss differs from FLARE's
    # with w = 0, whose clean stream stays token-causal.
    assert bd["loss_diff"] != pytest.approx(w0["loss_diff"], abs=1e-6)
    assert w0["loss_diff"] == pytest.approx(flare_m["loss_diff"], abs=1e-6)


def test_ar_objective_and_metrics(tiny_models):
    model = tiny_models["llama"][0]
    batch = _batch()
    loss, metrics = FlareObjective(ObjectiveConfig(kind="ar"), None)(model, batch)
    assert metrics["ar_tokens"] == int(batch.next_target_ok.sum()) and loss.item() == metrics["loss"]
    loss, metrics = FlareObjective(ObjectiveConfig(), MASK)(model, batch, torch.Generator().manual_seed(0))
    assert set(metrics) >= {"loss", "loss_ar", "loss_diff", "masked_fraction", "diff_tokens", "ar_tokens"}
    assert metrics["masked_fraction"] == pytest.approx(0.5)  # complementary views: half of the masks overall


def test_bad_inputs(tiny_models):
    model = tiny_models["qwen3_5"][0]
    with pytest.raises(ValueError, match="block_size"):
        ObjectiveConfig(block_size=0)
    with pytest.raises(ValueError, match="kind"):
        ObjectiveConfig(kind="mdlm")
    with pytest.raises(ValueError, match="mask token"):
        FlareObjective(ObjectiveConfig(), None)
    with pytest.raises(ValueError, match="loss_mask has shape"):
        PackedBatch(torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 5, dtype=torch.bool),
                    torch.zeros(2, 6, dtype=torch.long))
    unaligned = PackedBatch(torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.bool),
                            torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="block-aligned"):
        FlareObjective(ObjectiveConfig(block_size=3), MASK)(model, unaligned)
