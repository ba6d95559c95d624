"""The owner's reference counting (tessera._refcount), with a fake clock: what is freed, when, and what is kept."""

from __future__ import annotations

import os

import pytest

from tessera._refcount import RECORD_DELAY_S, RefCounter
from tessera.common import ids


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


def oid() -> bytes:
    return ids.new_id("object_id")


def task(n: int = 1) -> tuple[bytes, list[bytes]]:
    tid = os.urandom(ids.TASK_ID_LEN)
    return tid, [ids.object_id(tid, i + 1) for i in range(n)]


def test_a_put_is_freed_when_its_last_local_ref_goes(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    o = oid()
    c.own_put(o)
    c.born(o)
    c.born(o)
    c.died(o)
    assert not c.process()
    c.died(o)
    b = c.process()
    assert b.stored == [o] and b.big and not b.shared
    assert c.freed_reason(o) == "freed"
    assert not c.process(), "freed twice"


def test_refs_born_before_a_death_is_counted_are_never_lost(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    o = oid()
    c.own_put(o)
    c.born(o)
    c.died(o)  # queued, not counted yet
    c.born(o)  # a new ref meanwhile
    assert not c.process()
    assert c.local_count(o) == 1


def test_a_pending_task_holds_its_arguments_top_level_and_nested(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    top, nested = oid(), oid()
    for o in (top, nested):
        c.own_put(o)
        c.born(o)
    tid, (r,) = task()
    c.own_task(tid, [r], [top], [nested])
    c.died(top)
    c.died(nested)
    assert not c.process(), "the pending task holds both"
    c.task_ended(tid)
    b = c.process()
    assert sorted(b.stored) == sorted([top, nested])


def test_what_a_worker_borrowed_is_kept_for_the_owners_life(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    o = oid()
    c.own_put(o)
    c.born(o)
    tid, (r,) = task()
    c.own_task(tid, [r], [], [o])
    c.task_ended(tid, borrowed=[o])
    c.died(o)
    assert not c.process()
    b = c.release_all("owner died: test")
    assert o in b.shared and b.reason == "owner died: test"


def test_a_ref_serialized_outside_task_arguments_escapes(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    o, p = oid(), oid()
    for x in (o, p):
        c.own_put(x)
        c.born(x)
    c.escaped(o)  # e.g. tessera.put([ref])
    with c.capture() as got:
        c.escaped(p)  # into a task's arguments: collected, not escaped
    assert got == [p]
    c.died(o)
    c.died(p)
    b = c.process()
    assert b.stored == [p]
    assert c.freed_reason(o) is None


def test_task_records_go_a_while_after_their_returns_and_lineage_is_kept_for_readers(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    t1, (a,) = task()
    c.own_task(t1, [a], [], [])
    c.born(a)
    c.task_ended(t1)
    c.stored(a, big=True)
    t2, (b,) = task()
    c.own_task(t2, [b], [a], [])  # t2 reads a: a's lineage is needed while t2's record is kept
    c.born(b)
    c.task_ended(t2)
    c.died(a)
    batch = c.process()
    assert batch.stored == [a]
    clock.t += RECORD_DELAY_S + 1
    assert c.process().task_ids == [], "t1's record is needed to rebuild a for t2"
    c.died(b)
    last = c.process()  # both tasks ended long enough ago: their records go with b
    assert last.local == [b]
    assert sorted(last.task_ids) == sorted([t1, t2])
    assert c.stats() == {"owned": 0, "refs": 0, "tasks": 0, "escaped": 0}


def test_a_record_waits_its_delay_after_the_task_ended(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    tid, (r,) = task()
    c.own_task(tid, [r], [], [])
    c.born(r)
    c.task_ended(tid)
    c.died(r)
    assert c.process().local == [r]
    clock.t += RECORD_DELAY_S / 2
    assert c.process().task_ids == [], "its node may not have written the record yet"
    clock.t += RECORD_DELAY_S / 2
    assert c.process().task_ids == [tid]


def test_a_return_dropped_before_its_task_ends(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    tid, (r,) = task()
    c.own_task(tid, [r], [], [])
    c.born(r)
    c.died(r)
    assert c.process().local == [r]
    assert c.freed_reason(r) == "freed"
    c.task_ended(tid)
    clock.t += RECORD_DELAY_S + 1
    assert c.process().task_ids == [tid]


def test_free_now_and_twice(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    o, foreign = oid(), oid()
    c.own_put(o)
    c.born(o)
    b = c.free_now([o, foreign])
    assert sorted(b.shared) == sorted([o, foreign])
    assert not c.free_now([o, foreign])
    c.died(o)
    assert not c.process()


def test_a_worker_reports_what_it_still_holds_or_passed_on(clock: Clock) -> None:
    c = RefCounter(clock=clock, track_borrows=True)
    arg, kept, passed, mine = oid(), oid(), oid(), oid()
    c.own_put(mine)
    for x in (arg, kept, passed, mine):
        c.born(x)
    c.died(arg)  # the argument's ref died with the task's frame
    c.escaped(passed)  # nested in its return value
    c.escaped(mine)  # its own put, returned: kept by this worker, not reported
    assert sorted(c.borrowed_report()) == sorted([kept, passed])
    assert c.borrowed_report() == [], "reported once"
    assert c.freed_reason(mine) is None


def test_refs_kept_in_an_actors_state_go_when_the_actor_dies(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    o = oid()
    c.own_put(o)
    c.born(o)
    actor = os.urandom(ids.ACTOR_ID_LEN)
    tid, (r,) = task()
    c.own_task(tid, [r], [], [o])
    c.task_ended(tid, borrowed=[o], actor_id=actor)
    c.died(o)
    assert not c.process(), "the actor keeps it"
    assert c.borrowing_actors() == [actor]
    c.actor_died(actor)
    assert c.process().stored == [o], "no ref is left anywhere"
    assert c.borrowing_actors() == []
