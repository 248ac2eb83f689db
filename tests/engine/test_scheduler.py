"""The pure-Python scheduler: admission order, limits, aborts and slot accounting (no model involved)."""

from __future__ import annotations

import random

import pytest

from flare.engine import QueueFull, Scheduler, SchedulerConfig, Sequence, SequenceStatus


def seq(i: int, prompt_len: int = 4, max_new: int = 8) -> Sequence:
    return Sequence(f"r{i}", list(range(prompt_len)), max_new)


def test_admits_in_arrival_order_into_free_slots():
    s = Scheduler(SchedulerConfig(max_num_seqs=2))
    for i in range(3):
        s.add(seq(i))
    step = s.schedule()
    assert [q.request_id for q in step.admitted] == ["r0", "r1"]
    assert sorted(q.slot for q in step.running) == [0, 1]
    assert [q.request_id for q in s.waiting] == ["r2"]
    assert s.schedule().admitted == []  # full: nothing more until a slot frees
    done = step.running[0]
    freed = done.slot
    s.finish(done, "stop")
    assert done.status == SequenceStatus.FINISHED and done.slot is None
    nxt = s.schedule()
    assert [q.request_id for q in nxt.admitted] == ["r2"] and nxt.admitted[0].slot == freed


def test_prefill_token_budget_and_no_starvation():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_prefill_tokens=10))
    s.add(seq(0, 6)), s.add(seq(1, 6)), s.add(seq(2, 30))
    assert [q.request_id for q in s.schedule().admitted] == ["r0"]  # r1 would exceed the budget
    assert [q.request_id for q in s.schedule().admitted] == ["r1"]
    assert [q.request_id for q in s.schedule().admitted] == ["r2"]  # longer than the budget: admitted alone


def test_queue_full_and_duplicate_ids():
    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_waiting=2))
    s.add(seq(0)), s.add(seq(1))
    with pytest.raises(QueueFull):
        s.add(seq(2))
    with pytest.raises(ValueError, match="already in use"):
        s.add(seq(0))


def test_abort_waiting_and_running():
    s = Scheduler(SchedulerConfig(max_num_seqs=1))
    s.add(seq(0)), s.add(seq(1))
    running = s.schedule().running[0]
    assert s.abort("r1").status == SequenceStatus.ABORTED and not s.waiting
    assert s.abort("r0") is running and running.finish_reason == "abort" and s.free_slots == [0]
    assert s.abort("r0") is None and s.abort("nope") is None
    assert not s.has_work


def test_random_traffic_never_leaks_slots():
    rng = random.Random(0)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_waiting=1000, max_prefill_tokens=20))
    n = 0
    for _ in range(2000):
        action = rng.random()
        if action < 0.4:
            s.add(seq(n, rng.randint(1, 12)))
            n += 1
        elif action < 0.7:
            s.schedule()
        elif action < 0.85 and s.running:
            s.finish(rng.choice(list(s.running.values())), "length")
        elif n:
            s.abort(f"r{rng.randrange(n)}")
        slots = [q.slot for q in s.running.values()]
        assert len(set(slots)) == len(slots) and len(slots) + len(s.free_slots) == 4
        assert set(slots).isdisjoint(s.free_slots)
    while s.waiting or s.running:
        for q in s.schedule().running:
            s.finish(q)
    assert sorted(s.free_slots) == [0, 1, 2, 3]


def test_sequence_update_returns_what_is_new():
    q = Sequence("a", [1, 2], max_new_tokens=5)
    assert q.update([7, 8], None) == [7, 8] and q.finish_reason is None
    assert q.update([7, 8, 9], "stop") == [9] and q.finish_reason == "stop" and q.output_ids == [7, 8, 9]
    with pytest.raises(ValueError, match="cannot change"):
        q.update([7, 6, 9, 1], None)
    with pytest.raises(ValueError, match="empty"):
        Sequence("c", [], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sequence("d", [1], 0)


def test_bookkeeping_imports_no_torch():
    """Scheduler and sequences are pure Python (testable with a mock model, cheap to reason about)."""
    import ast
    from pathlib import Path

    import flare.engine.scheduler as sched
    import flare.engine.sequence as sq

    for module in (sched, sq):
        tree = ast.parse(Path(module.__file__).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(name.split(".")[0] == "torch" for name in names), module.__name__


def test_the_lowest_free_slot_is_handed_out_first():
    """A forward covers slots up to the last busy one: a lone request after a wave takes slot 0, not the last
    slot freed."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_waiting=8, max_prefill_tokens=100))
    seqs = [seq(i, 2, 3) for i in range(4)]
    for one in seqs:
        sched.add(one)
    sched.schedule()
    for one in (seqs[2], seqs[0], seqs[3], seqs[1]):
        sched.finish(one)
    lone = seq(9, 2, 3)
    sched.add(lone)
    sched.schedule()
    assert lone.slot == 0 and sched.free_slots == [3, 2, 1]
