"""Cached decoding == one full forward; a ragged batch == each sequence alone."""

from __future__ import annotations

import copy

import pytest
import torch

from flare.testing.checkpoints import FAMILIES


# In float64 the cached path must agree with the full forward to round-off (this is what proves the caches
# exact); in fp32 the two paths sum in different orders (chunked vs stepwise recurrence, GEMMs of other shapes),
# so they agree to a few ulps of the logits.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-5}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_len", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_step_decoding_matches_full_forward(tiny_models, family, prompt_len, dtype):
    model = copy.deepcopy(tiny_models[family][0]).to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, prompt_len + 24))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, capacity=8)  # small on purpose: forces the KV slots to grow
        pieces = [model(ids[:, :prompt_len], cache=cache)]
        t = prompt_len
        for width in [1, 1, 3, 1, 7, 1, 2, 1, 1, 1, 5]:  # single steps and multi-token chunks
            pieces.append(model(ids[:, t : t + width], cache=cache))
            t += width
    stepped = torch.cat(pieces, dim=1)
    assert t == ids.shape[1]
    assert (stepped - full).abs().max().item() <= TOLERANCE[dtype]
    assert cache.lengths.tolist() == [t, t]


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_ragged_prefill_equals_each_sequence_alone(tiny_models, family):
    model, _ = tiny_models[family]
    lengths = [3, 17, 9]
    seqs = [torch.randint(0, model.config.vocab_size, (n,)) for n in lengths]
    ids = torch.zeros(3, max(lengths), dtype=torch.long)
    valid = torch.zeros(3, max(lengths), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], valid[i, : len(s)] = s, True
    nxt = torch.randint(0, model.config.vocab_size, (3, 1))
    with torch.no_grad():
        cache = model.new_cache(3)
        batched = model(ids, cache=cache, valid=valid)
        batched_next = model(nxt, cache=cache)
        for i, s in enumerate(seqs):
            alone_cache = model.new_cache(1)
            alone = model(s[None], cache=alone_cache)
            alone_next = model(nxt[i : i + 1], cache=alone_cache)
            assert (batched[i, : len(s)] - alone[0]).abs().max() <= 1e-5
            assert (batched_next[i] - alone_next[0]).abs().max() <= 1e-5
    assert cache.lengths.tolist() == [n + 1 for n in lengths]


def test_clone_is_independent(tiny_models):
    model, _ = tiny_models["qwen3_5"]
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        cache = model.new_cache(1)
        model(ids, cache=cache)
        snap = cache.clone()
        a = model(ids[:, :1], cache=cache)
        b = model(ids[:, :1], cache=snap)
    assert torch.equal(a, b)
    assert cache.layers[0].ssm.data_ptr() != snap.layers[0].ssm.data_ptr()


@pytest.mark.parametrize("T", [1, 2])  # a decode step updates states in place; longer runs replace them
def test_a_narrowed_cache_runs_the_first_rows_exactly(tiny_models, T):
    """A forward on narrow(n) == the same forward on the whole cache, for the first n sequences; the rest of
    the cache is untouched."""
    model = tiny_models["qwen3_5"][0]
    full = model.new_cache(4)
    step = torch.randint(0, 90, (4, T))
    with torch.no_grad():
        model.hidden_states(torch.randint(0, 90, (4, 5)), cache=full)
        twin = full.clone()
        before = full.clone()
        want = model.hidden_states(step, cache=full)
        twin.reserve(T)
        sub = twin.narrow(2)
        got = model.hidden_states(step[:2], cache=sub)
        twin.absorb(sub)
    torch.testing.assert_close(got, want[:2], rtol=1e-5, atol=1e-5)
    assert twin.lengths.tolist() == [5 + T, 5 + T, 5, 5]
    for a, b, c in zip(twin.layers, full.layers, before.layers):
        if not hasattr(a, "k"):
            assert torch.equal(a.ssm[2:], c.ssm[2:]) and torch.equal(a.conv[2:], c.conv[2:])
    for a, b in zip(twin.layers, full.layers):
        if hasattr(a, "k"):
            torch.testing.assert_close(a.k[:2, :, :7], b.k[:2, :, :7], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(a.ssm[:2], b.ssm[:2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.conv[:2], b.conv[:2], rtol=1e-5, atol=1e-5)


def test_weight_derived_values_follow_the_weights(tiny_models):
    """Inside frozen_weights() a norm's 1 + w and the GDN decay are kept between forwards, but an in-place
    weight change (what an optimizer step does) is seen at once; outside the context nothing is kept."""
    from flare.model import frozen_weights

    model = copy.deepcopy(tiny_models["qwen3_5"][0])
    ids = torch.randint(0, 90, (2, 6))
    with torch.no_grad(), frozen_weights():
        before = model(ids)
        for p in model.parameters():
            if p.dim() == 1:  # norm weights, A_log, dt_bias
                p.add_(0.05)
        after = model(ids)
    with torch.no_grad():
        fresh = model(ids)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)


def test_reset_empties_chosen_slots_in_place(tiny_models):
    """A reset zeroes the chosen slots' recurrent states in the tensors the cache already holds (no state-sized
    allocation per admitted request) and leaves the other slots' states as they were; the emptied slot then
    decodes as a fresh cache would."""
    model, _ = tiny_models["qwen3_5"]
    ids = torch.randint(0, model.config.vocab_size, (3, 6))
    with torch.no_grad():
        cache = model.new_cache(3)
        model(ids, cache=cache)
        gdn = [layer for layer in cache.layers if hasattr(layer, "ssm")]
        before = [(layer.ssm.clone(), layer.conv.clone(), layer.ssm.data_ptr()) for layer in gdn]
        cache.reset([1])
        for layer, (ssm, conv, ptr) in zip(gdn, before):
            assert layer.ssm.data_ptr() == ptr
            assert torch.equal(layer.ssm[1], torch.zeros_like(ssm[1]))
            assert torch.equal(layer.conv[1], torch.zeros_like(conv[1]))
            assert torch.equal(layer.ssm[[0, 2]], ssm[[0, 2]]) and torch.equal(layer.conv[[0, 2]], conv[[0, 2]])
        assert cache.lengths.tolist() == [6, 0, 6]
        fresh = model.new_cache(1)
        new = torch.randint(0, model.config.vocab_size, (1, 4))
        want = model(new, cache=fresh)
        mixed = model(torch.cat([ids[:1, :4], new, ids[2:, :4]]), cache=cache)
    assert (mixed[1] - want[0]).abs().max() <= 1e-5


def test_reset_outside_inference_mode_of_states_made_inside_it(tiny_models):
    """States a forward made under ``torch.inference_mode`` cannot be written in place outside it: a reset there
    replaces them, with the same result."""
    model, _ = tiny_models["qwen3_5"]
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    cache = model.new_cache(2)
    with torch.inference_mode():
        model(ids, cache=cache)
    cache.reset([0])
    for layer in cache.layers:
        if hasattr(layer, "ssm"):
            assert not layer.ssm[0].any() and layer.ssm[1].any() and not layer.conv[0].any()


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next"])
def test_long_extension_of_a_filled_cache_matches_full_forward(tiny_models, family):
    """A prefill into empty caches starts the chunked recurrence from no state; a second long chunk (chunked
    form again) must start from the committed one."""
    if family not in tiny_models:
        pytest.skip(f"no {family} model")
    model = copy.deepcopy(tiny_models[family][0]).to(torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (2, 50))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        stepped = torch.cat([model(ids[:, :20], cache=cache), model(ids[:, 20:], cache=cache)], dim=1)
    assert (stepped - full).abs().max().item() <= TOLERANCE[torch.float64]
