"""The recurrent layers' kept commits added at once (``PendingStack``) == added layer by layer, bit for bit."""

from __future__ import annotations

import pytest
import torch

import flare.ops.gated_delta.pending as pending
from flare.model import CommitRecord
from flare.model.cache import RecurrentState
from flare.model.context import Rows
from flare.ops.gated_delta.pending import PendingCommits, write_update
from flare.ops.gated_delta.pending_stack import PendingStack


def _recurrent(cache):
    return [layer for layer in cache.layers if isinstance(layer, RecurrentState)]


def _layer_by_layer(cache):
    """``cache`` with every recurrent layer given an update of its own (not the stack's view): commits go layer by
    layer."""
    for layer in _recurrent(cache):
        layer.pending = layer.pending.clone()
    assert cache._held_stack() is None
    return cache


def _assert_same(a, b):
    for x, y in zip(_recurrent(a), _recurrent(b)):
        assert x.pending.used == y.pending.used
        for name in ("scale", "k", "u"):
            assert torch.equal(getattr(x.pending, name), getattr(y.pending, name)), name
        assert torch.equal(x.ssm, y.ssm) and torch.equal(x.conv, y.conv)
    assert torch.equal(a.lengths, b.lengths)


@pytest.mark.parametrize("sub", [None, 2])
def test_stacked_commits_equal_layer_by_layer_ones(flare_models, monkeypatch, sub):
    """Rounds of rows forwards and commits, enough to fill the updates' room (the states are written, then kept
    again), on the whole cache or a narrowed one: the stacked cache and the layer-by-layer one hold the same
    updates, states and conv windows; a clone keeps the stack; a reset clears the emptied slots of every layer."""
    monkeypatch.setattr(pending, "KEEP_MIN_STATE_BYTES", 0)
    monkeypatch.setattr(pending, "PENDING_ROWS", 12)
    model = flare_models["qwen3_5"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        stacked = model.new_cache(3)
        assert stacked._held_stack() is not None
        model.hidden_states(torch.randint(0, 90, (3, 6), generator=g), cache=stacked)
        single = _layer_by_layer(stacked.clone())
        assert stacked.clone()._held_stack() is not None
        n_seq = sub or 3
        for r, n in enumerate([[1, 3, 0], [3, 3, 3], [0, 2, 1], [2, 0, 3]]):
            rows = torch.cat([torch.randint(0, 90, (n_seq, 3), generator=g), torch.full((n_seq, 2), 95)], 1)
            n_accept = torch.tensor(n[:n_seq])
            for cache in (stacked, single):
                cache.reserve(5)
                if sub and cache.pending_room() < 5:
                    cache.settle()  # (a narrowed cache cannot write the whole batch's states; a whole one does)
                run = cache.narrow(n_seq) if sub else cache
                record = CommitRecord.empty()
                model.hidden_states(rows, cache=run, layout=Rows(3), record=record)
                run.commit(record, n_accept)
                if sub:
                    cache.absorb(run)
            _assert_same(stacked, single)
        assert _recurrent(stacked)[0].pending.used > 0
        for cache in (stacked, single):
            cache.reset([1])
        _assert_same(stacked, single)
        assert all(torch.equal(layer.pending.scale[1], torch.ones_like(layer.pending.scale[1]))
                   for layer in _recurrent(stacked))


def test_a_stack_needs_states_of_one_shape_and_room():
    a, b = torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 3)
    with pytest.raises(ValueError, match="one shape"):
        PendingStack.empty([a, b])
    assert PendingStack.empty([a, a], rows=0) is None and PendingStack.empty([]) is None
    stack = PendingStack.empty([a, a], rows=2)
    assert stack.holds(stack.views) and not stack.holds([stack.views[0], PendingCommits.empty(a, rows=2)])
    with pytest.raises(RuntimeError, match="settle"):
        stack.add(torch.ones(2, 2, 2, 1, 1), torch.zeros(2, 2, 2, 3, 4),
                  torch.zeros(2, 2, 2, 3, 4))


def test_commits_written_at_once_equal_layer_by_layer_ones(flare_models, monkeypatch):
    """States too small to keep commits are written at once, every layer's update computed together: the same
    states, bit for bit, as each layer's own update written on its own (as ``PendingCommits.commit`` writes it)."""
    monkeypatch.setattr(pending, "KEEP_MIN_STATE_BYTES", 1 << 62)
    model = flare_models["qwen3_5"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        cache = model.new_cache(3)
        assert cache.stack is None and all(layer.pending.room == 0 for layer in _recurrent(cache))
        model.hidden_states(torch.randint(0, 90, (3, 6), generator=g), cache=cache)
        for n in ([1, 3, 0], [3, 2, 3]):
            rows = torch.cat([torch.randint(0, 90, (3, 3), generator=g), torch.full((3, 2), 95)], 1)
            record = CommitRecord.empty()
            model.hidden_states(rows, cache=cache, layout=Rows(3), record=record)
            record.rows = 3
            n_accept = torch.tensor(n)
            want = [write_update(layer.ssm.clone(), 3, *record.gdn[i][0].update_after(n_accept, rows=3))
                    for i, layer in enumerate(cache.layers) if isinstance(layer, RecurrentState)]
            cache.commit(record, n_accept)
            for layer, state in zip(_recurrent(cache), want):
                assert torch.equal(layer.ssm, state)
