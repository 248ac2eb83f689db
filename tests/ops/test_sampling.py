"""The batched sampler: filters, greedy rows, seeded draws that follow the distribution."""

from __future__ import annotations

import pytest
import torch

from flare.decoding.slots import SlotBatch
from flare.decoding.params import SamplingParams
from flare.ops.sampling import Filters, argmax, draw, filtered_probs, nucleus_floor, sample, speculative_verify


def _rows(n, t=1.0, k=0, p=1.0):
    return torch.full((n,), float(t)), torch.full((n,), k, dtype=torch.long), torch.full((n,), float(p))


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    probs = filtered_probs(logits, *_rows(1, k=2))
    torch.testing.assert_close(probs, torch.tensor([[0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]]))
    probs = filtered_probs(logits, *_rows(1, p=0.8))  # 0.5 + 0.2 < 0.8, so the third token is needed too
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    probs = filtered_probs(logits, *_rows(1, p=0.01))  # never empty: the top token always stays
    torch.testing.assert_close(probs, torch.tensor([[1.0, 0, 0, 0, 0]]))


def test_rows_use_their_own_settings_and_temperature_zero_is_argmax():
    logits = torch.randn(3, 50)
    temp = torch.tensor([0.0, 1.0, 2.0])
    probs = filtered_probs(logits, temp, torch.tensor([0, 5, 0]), torch.tensor([1.0, 1.0, 1.0]))
    assert probs[0].argmax() == logits[0].argmax() and probs[0].max() == 1.0
    assert (probs[1] > 0).sum() == 5
    torch.testing.assert_close(probs[2], torch.softmax(logits[2] / 2, -1))
    assert torch.equal(sample(logits, temp * 0, *_rows(3)[1:]), logits.argmax(-1))


def test_draws_follow_the_distribution():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    draws = draw(p.expand(n, 4).contiguous(), gen)
    freq = torch.bincount(draws, minlength=4).float() / n
    assert (freq - p).abs().max() < 0.01
    again = draw(p.expand(n, 4).contiguous(), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 7), (72, 4099), (3, 2, 1000), (5, 1), (2, 1024), (2, 3, 1537), (9, 49153)])
def test_argmax_equals_torch_argmax_ties_included(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    for high in (2, 5, 1000):  # few distinct values: many tied maxima, the first must win as in argmax
        x = torch.randint(0, high, shape, generator=g).to(dtype)
        x[..., -1] = float("-inf")
        assert torch.equal(argmax(x), x.argmax(-1))
        strided = x.transpose(0, -1).contiguous().transpose(0, -1)
        assert torch.equal(argmax(strided), x.argmax(-1))


def _settings(n, V, g):
    """Per-row temperature, top-k and top-p over every combination the filters treat apart, and their Filters."""
    temps = torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.randint(0, 4, (n,), generator=g)]
    ks = torch.tensor([0, 0, 1, 3, V, V + 5])[torch.randint(0, 6, (n,), generator=g)]
    ps = torch.tensor([1e-6, 0.3, 0.9, 0.999, 1.0, 1.0])[torch.randint(0, 6, (n,), generator=g)]
    sampled = temps > 0
    filters = Filters(int(torch.where(sampled, ks, 0).max()), bool((sampled & (ks == 0) & (ps < 1)).any()))
    return temps, ks, ps, filters


def _is_prefix(probs, kept):
    """Every kept token at least as likely as every dropped one, per row."""
    low = torch.where(kept, probs, torch.inf).amin(-1)
    high = torch.where(kept, -torch.inf, probs).amax(-1)
    return bool((low >= high).all())


@pytest.mark.parametrize("V", [1, 2, 7, 257, 1000, 49_153])
@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
def test_filters_without_a_sort_keep_what_the_sort_keeps(V, scale):
    """The selecting path (top-k among the k_max likeliest, the nucleus by a radix select) against one sort of the
    vocabulary: the same tokens where the distribution is peaked; where it is flat (thousands of tokens in the
    nucleus) the sums that decide the edge run in another order, so the two may differ at the edge only."""
    g = torch.Generator().manual_seed(V + int(10 * scale))
    n = 24
    logits = torch.randn(n, V, generator=g) * scale
    temps, ks, ps, filters = _settings(n, V, g)
    want = filtered_probs(logits, temps, ks, ps)
    got = filtered_probs(logits, temps, ks, ps, filters)
    assert torch.allclose(got.sum(-1), torch.ones(n)) and bool((got[torch.arange(n), logits.argmax(-1)] > 0).all())
    base = torch.softmax(logits / torch.where(temps > 0, temps, 1.0)[:, None], -1)
    assert _is_prefix(base, got > 0)
    if scale >= 3.0:
        assert torch.equal(got > 0, want > 0)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        assert (got - want).abs().sum(-1).max() < 1e-3


def test_the_nucleus_edge_with_tied_probabilities():
    """bf16 logits tie often: a nucleus keeps every token tied with its smallest one, and its mass without that
    value stays below top_p while with it it reaches top_p."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 3000, generator=g) * 2).to(torch.bfloat16).float()
    top_p = torch.rand(16, generator=g) * 0.9 + 0.05
    got = filtered_probs(logits, torch.ones(16), torch.zeros(16, dtype=torch.long), top_p, Filters(0, True))
    probs = torch.softmax(logits, -1)
    kept = got > 0
    assert _is_prefix(probs, kept)
    edge = torch.where(kept, probs, torch.inf).amin(-1, keepdim=True)
    assert bool(((probs == edge) <= kept).all())  # ties of the edge all kept
    above = torch.where(probs > edge, probs, 0.0).sum(-1)
    assert bool((above < top_p + 1e-6).all()) and bool((torch.where(kept, probs, 0.0).sum(-1) >= top_p - 1e-6).all())


def test_nucleus_floor_reads_the_bits_of_the_edge_probability():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.1, 0.15, 0.2, 0.5]])
    floor = nucleus_floor(probs, torch.tensor([0.8, 0.5]))
    assert floor.view(torch.float32).flatten().tolist() == [probs[0, 2].item(), 0.5]
    # a whole mass below top_p (rounding): every token stays
    assert nucleus_floor(probs * 0.9, torch.tensor([0.95, 0.95])).flatten().tolist() == [0, 0]


def test_a_row_filters_the_same_alone_and_in_a_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 4099, generator=g) * 4
    temps, ks, ps, filters = _settings(12, 4099, g)
    together = filtered_probs(logits, temps, ks, ps, filters)
    for i in range(12):
        alone = filtered_probs(logits[i:i + 1], temps[i:i + 1], ks[i:i + 1], ps[i:i + 1], filters)
        assert torch.equal(alone[0], together[i])


def test_a_slot_batch_says_what_its_sampled_slots_filter_by():
    slots = SlotBatch(4, "cpu")
    for i, params in enumerate([SamplingParams(temperature=0.0, top_k=50), SamplingParams(temperature=1.0, top_k=7),
                                SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.0)]):
        slots.admit(i, params, [], None, 8)
    assert slots.filters([0]) == Filters(0, False, True)  # greedy: a one-hot, whatever it asked
    assert slots.filters([0, 1]) == Filters(7, False, True)
    assert slots.filters([1, 2, 3]) == Filters(7, True, False)
    assert slots.filters([3]) == Filters(0, False, False)


@pytest.mark.parametrize("u", [0.0, 0.5, 1.0 - 2**-24, 1.0])
def test_a_draw_never_picks_a_token_without_mass(monkeypatch, u):
    """Inverse of the cumulative mass at one uniform number a row: at its ends (u = 0, and u * mass rounding up to
    the whole mass) the draw still lands on a token with mass; one-hot rows give their token; any leading shape."""
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0], [0.25, 0.0, 0.0, 0.75]])
    monkeypatch.setattr(torch, "rand", lambda shape, generator=None, device=None: torch.full(shape, u))
    got = draw(probs)
    assert bool((probs[torch.arange(3), got] > 0).all())
    assert got[1] == 2
    assert torch.equal(draw(probs[None].expand(2, 3, 4).contiguous()), got.expand(2, 3))


def test_speculative_verify_judges_each_rows_prefix_of_drafts():
    """A row verifies its first ``verified`` drafts only: drafts past them never pass, and when all of those pass
    the next token comes from the row after them (row 0 for a row that verifies none); every row takes the same
    random numbers whatever it verifies."""
    V, M = 6, 3
    p = torch.zeros(4, M + 1, V)
    p[:, torch.arange(M + 1), torch.arange(M + 1)] = 1.0  # row i is sure of token i
    drafts = torch.arange(M).expand(4, M)  # every draft is its row's sure token: each passes when verified
    q = p[:, :M].clone()
    verified = torch.tensor([0, 1, 2, 3])
    accepted, nxt = speculative_verify(p, q, drafts, torch.Generator().manual_seed(0), verified_B=verified)
    assert accepted.tolist() == [0, 1, 2, 3] and nxt.tolist() == [0, 1, 2, 3]
    # A rejection within the prefix draws from the residual at that draft; the stream advances the same.
    bad = drafts.clone()
    bad[:, 0] = 5
    q_bad = torch.nn.functional.one_hot(bad, V).float()
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    accepted, nxt = speculative_verify(p, q_bad, bad, g1, verified_B=verified)
    assert accepted.tolist() == [0, 0, 0, 0] and nxt.tolist() == [0, 0, 0, 0]
    speculative_verify(p, q_bad, bad, g2)
    assert torch.rand(1, generator=g1) == torch.rand(1, generator=g2)
