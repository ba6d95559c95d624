"""The owner's reference counting (tessera._refcount), with a fake clock: what is freed, when, and what is kept."""

from __future__ import annotations

import json
import os

import pytest

from tessera._core import read_table
from tessera._refcount import RECORD_DELAY_S, BorrowerTable, RefCounter
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


def test_what_a_worker_borrowed_without_naming_its_table_is_kept_for_the_owners_life(clock: Clock) -> None:
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


def lent(c: RefCounter, o: bytes, borrower: str, *, actor: bytes = b"") -> None:
    """``o`` (whose ref the caller holds) goes nested into a task whose worker ``borrower`` keeps it."""
    tid, (r,) = task()
    c.own_task(tid, [r], [], [o])
    c.task_ended(tid, borrowed=[o], borrower=borrower, actor_id=actor)


def table(*holds: bytes, alive: bool = True, escaped: tuple[bytes, ...] = ()) -> BorrowerTable:
    return BorrowerTable(alive=alive, holds=frozenset(holds), escaped=frozenset(escaped))


def test_a_borrow_ends_when_the_borrowers_table_stops_listing_the_object(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    o = oid()
    c.own_put(o)
    c.born(o)
    lent(c, o, "host:1")
    c.died(o)
    assert not c.process(), "the borrower keeps it"
    assert c.borrower_keys() == ["host:1"]
    since = clock.t
    clock.t += 1
    c.borrowers_checked({"host:1": table(o)}, since)
    assert not c.process(), "its table still lists it"
    c.borrowers_checked({"host:1": BorrowerTable(alive=True, holds=None)}, clock.t + 1)
    assert not c.process(), "a table that does not say what it holds ends nothing"
    c.borrowers_checked({"host:1": table()}, clock.t + 1)
    assert c.process().stored == [o]
    assert c.borrower_keys() == []


def test_a_table_read_before_the_borrow_was_reported_ends_nothing(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    o = oid()
    c.own_put(o)
    c.born(o)
    since = clock.t  # the read started here...
    clock.t += 1
    lent(c, o, "host:1")  # ...and the borrow was reported while it was under way
    c.died(o)
    c.borrowers_checked({"host:1": table()}, since)
    assert not c.process(), "the table read may predate the borrow"
    c.borrowers_checked({"host:1": table()}, clock.t + 0.5)
    assert c.process().stored == [o]


@pytest.mark.parametrize("gone", [None, table(alive=False)], ids=["no-table", "stale-table"])
def test_a_borrower_that_died_releases_its_borrow(clock: Clock, gone: BorrowerTable | None) -> None:
    c = RefCounter(clock=clock)
    o, p = oid(), oid()
    for x in (o, p):
        c.own_put(x)
        c.born(x)
    lent(c, o, "host:1")
    lent(c, p, "host:2")
    c.died(o)
    c.died(p)
    clock.t += 1
    c.borrowers_checked({"host:1": gone if gone is None else table(o, alive=False), "host:2": table(p)}, clock.t)
    assert c.process().stored == [o], "host:2 is alive and holds p"
    assert c.borrower_keys() == ["host:2"]


def test_a_ref_a_borrower_passed_on_untracked_is_kept_for_the_owners_life(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    o = oid()
    c.own_put(o)
    c.born(o)
    lent(c, o, "host:1")
    c.died(o)
    clock.t += 1
    c.borrowers_checked({"host:1": table(alive=False, escaped=(o,))}, clock.t)  # even once it is stale
    assert not c.process()
    assert c.borrower_keys() == [] and c.stats()["escaped"] == 1
    assert o in c.release_all("owner died: test").shared


def test_an_actors_borrow_ends_with_the_actor_or_with_its_table(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    o, p = oid(), oid()
    for x in (o, p):
        c.own_put(x)
        c.born(x)
    actor = os.urandom(ids.ACTOR_ID_LEN)
    lent(c, o, "host:7", actor=actor)
    lent(c, p, "host:7", actor=actor)
    c.died(o)
    c.died(p)
    assert c.borrowing_actors() == [actor] and c.borrower_keys() == ["host:7"]
    clock.t += 1
    c.borrowers_checked({"host:7": table(o)}, clock.t)  # its state let p go
    assert c.process().stored == [p]
    c.actor_died(actor)
    assert c.process().stored == [o], "the actor's death ends its borrows at once"
    assert c.borrowing_actors() == [] and c.borrower_keys() == []


def test_a_borrower_lists_what_it_lent_on_until_its_own_borrowers_let_go(clock: Clock) -> None:
    b = RefCounter(clock=clock, track_borrows=True)  # a worker that borrowed x from its owner
    x = oid()
    b.born(x)  # x arrived nested in the task's argument
    tid, (r,) = task()
    b.own_task(tid, [r], [], [x])  # it passes x on, nested in a task's argument
    b.died(x)  # and drops its own ref
    assert b.borrowed_report() == [x], "the task it lent x to holds it"
    held, escaped = b.holds()
    assert held == [x] and escaped == []
    b.announced(held)
    b.task_ended(tid, borrowed=[x], borrower="host:3")  # that task's worker keeps x
    assert b.holds()[0] == [x] and not b.holds_gone()
    clock.t += 1
    b.borrowers_checked({"host:3": table(x)}, clock.t)
    assert b.holds()[0] == [x] and not b.holds_gone()
    b.borrowers_checked({"host:3": table()}, clock.t)
    assert b.holds_gone(), "its table must say so soon"
    assert b.holds() == ([], [])
    b.announced([])
    assert not b.holds_gone()


def test_a_borrower_marks_what_it_passed_on_untracked(clock: Clock) -> None:
    b = RefCounter(clock=clock, track_borrows=True)
    x = oid()
    b.born(x)
    b.escaped(x)  # nested in its return value
    b.died(x)
    assert b.borrowed_report() == [x]
    assert b.holds() == ([x], [x]), "held for its life, and its owner is told"


def test_a_borrower_publishes_again_when_an_announced_ref_goes(clock: Clock) -> None:
    b = RefCounter(clock=clock, track_borrows=True)
    x, y = oid(), oid()
    b.born(x)
    b.announced(b.holds()[0])
    b.born(y)  # not announced: its going changes nothing anyone reads
    b.died(y)
    assert not b.holds_gone()
    b.died(x)
    assert b.holds_gone()


def test_a_published_table_is_stale_by_the_staleness_it_states() -> None:
    x, y = oid(), oid()
    doc = {"time": 1000.0, "stale_s": 6.0, "holds": [x.hex(), y.hex()], "escaped": [y.hex()]}
    t = read_table(json.dumps(doc).encode(), 1005.0)
    assert t.alive and t.holds == {x, y} and t.escaped == {y}
    assert not read_table(json.dumps(doc).encode(), 1006.5).alive
    old = read_table(json.dumps({"time": 1000.0, "rows": []}).encode(), 1030.0)  # a table of an older process
    assert old.alive and old.holds is None, "it says nothing of what it holds: nothing is released by it"
    assert not read_table(json.dumps({"time": 1000.0, "holds": None}).encode(), 1036.0).alive


def test_a_generators_items_are_owned_and_freed_like_returns(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    tid, _ = task(0)
    c.own_task(tid, [], [], [])  # a streaming task: no returns known at submission
    taken, left, late = (ids.object_id(tid, i) for i in (1, 2, 3))
    c.add_return(tid, taken)
    c.add_return(tid, left)
    c.born(taken)  # handed out as a ref
    c.stored(taken, big=True)
    c.stored(left, big=True)
    c.add_return(tid, taken)  # sent again by a retry: nothing changes
    assert c.owns(taken) and c.owns(left)
    c.unreferenced([left, taken])  # the generator is dropped: what it never handed out goes
    b = c.process()
    assert b.stored == [left], "an item still referenced was freed, or a dropped one was not"
    c.task_ended(tid)
    c.add_return(tid, late, unreferenced=True)  # yielded after the generator was dropped
    assert c.process().local == [late]
    c.died(taken)
    assert c.process().stored == [taken]
    clock.t += RECORD_DELAY_S + 1
    assert tid in c.process().task_ids
    c.add_return(tid, ids.object_id(tid, 4))  # the task's record is gone: an item now is not owned
    assert not c.owns(ids.object_id(tid, 4))


# ---------------------------------------------------------------------- refs nested in objects' values


def test_a_put_holds_the_refs_in_its_value_while_it_lives(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    inner, box = oid(), oid()
    c.own_put(inner)
    c.born(inner)
    with c.capture() as nested:
        c.escaped(inner)  # tessera.put([inner])
    c.own_put(box)
    c.born(box)
    c.contains(box, nested)
    c.died(inner)
    assert not c.process(), "the box holds it"
    assert any(r["reference"] == "contained" for r in c.table())
    c.died(box)
    assert c.process().stored == [box, inner], "freed with the box that held it"


def test_a_ref_i_do_not_own_held_in_my_object_is_listed_until_the_object_goes(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    theirs, box = oid(), oid()
    c.born(theirs)
    c.own_put(box)
    c.born(box)
    c.contains(box, [theirs])
    c.died(theirs)
    assert c.holds()[0] == [theirs]
    c.announced(c.holds()[0])
    assert not c.holds_gone()
    c.died(box)
    assert c.process().stored == [box]
    assert c.holds() == ([], [])
    assert c.holds_gone(), "publish the table that no longer lists it"


def test_a_task_returning_a_ref_it_took_keeps_it_for_as_long_as_the_return_lives(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    inner = oid()
    c.own_put(inner)
    c.born(inner)
    tid, (ret,) = task()
    c.own_task(tid, [ret], [], [inner])  # f.remote([inner])
    c.born(ret)
    c.died(inner)  # the driver's del
    c.contains(ret, [inner])  # its result: return 1 holds [inner]
    c.task_ended(tid)
    assert not c.process(), "the return value holds it"
    c.died(ret)
    b = c.process()
    assert b.local == [ret] and b.stored == [inner], "the ref the return held goes with it"


def test_a_worker_lends_returned_refs_to_the_submitters_table(clock: Clock) -> None:
    w = RefCounter(clock=clock, track_borrows=True)
    mine = oid()
    w.own_put(mine)  # put inside the task, returned nested
    w.born(mine)
    w.lend([mine], "driver:1", grace=5.0)
    w.died(mine)
    assert not w.process()
    assert w.borrower_keys() == ["driver:1"]
    w.borrowers_checked({"driver:1": None}, clock.t)
    assert not w.process(), "within its grace a missing table ends nothing: it has not published yet"
    clock.t += 6
    w.borrowers_checked({"driver:1": table(mine)}, clock.t)
    assert not w.process(), "the submitter lists it"
    clock.t += 1
    w.borrowers_checked({"driver:1": table()}, clock.t)
    assert w.process().stored == [mine], "freed once the submitter lets go"


def test_without_a_submitter_table_lent_refs_are_kept(clock: Clock) -> None:
    w = RefCounter(clock=clock, track_borrows=True)
    mine = oid()
    w.own_put(mine)
    w.born(mine)
    w.lend([mine], "")
    w.died(mine)
    assert not w.process()
    assert w.stats()["escaped"] == 1


def test_a_worker_does_not_report_back_what_only_its_submitter_borrows(clock: Clock) -> None:
    w = RefCounter(clock=clock, track_borrows=True)
    theirs, other = oid(), oid()
    w.born(theirs)  # arrived nested in an argument during the task
    w.born(other)
    w.lend([theirs], "driver:1")
    w.died(theirs)
    assert w.borrowed_report("driver:1") == [other], "reporting theirs to driver:1 would make each hold it for the other"
    w.born(theirs)
    w.lend([theirs], "driver:1")
    assert w.borrowed_report("driver:1") == [theirs], "still held here (a local ref): reported"


def test_a_borrower_of_a_value_that_kept_a_ref_from_it_borrows_that_ref(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    inner, box = oid(), oid()
    for x in (inner, box):
        c.own_put(x)
        c.born(x)
    c.contains(box, [inner])
    lent(c, box, "host:1")  # host:1 borrows the box, unpacks it and keeps inner
    c.died(inner)
    c.died(box)
    clock.t += 1
    since = clock.t
    c.borrowers_checked({"host:1": table(inner)}, since)  # no longer lists the box: lists inner
    assert c.process().stored == [box]
    assert not c.process(), "host:1 borrows inner now"
    clock.t += 1
    c.borrowers_checked({"host:1": table(inner)}, clock.t)
    assert not c.process()
    clock.t += 1
    c.borrowers_checked({"host:1": table()}, clock.t)
    assert c.process().stored == [inner]


def test_the_borrowers_of_a_borrower_are_handed_over_to_the_owner(clock: Clock) -> None:
    c = RefCounter(clock=clock, me="owner:1")
    o = oid()
    c.own_put(o)
    c.born(o)
    lent(c, o, "worker:1")  # worker:1 borrows it and lends it on to driver:2 (and back to me)
    c.died(o)
    clock.t += 1
    c.borrowers_checked({"worker:1": BorrowerTable(alive=True, holds=frozenset([o]),
                                                   lent={o: frozenset(["driver:2", "owner:1"])})}, clock.t)
    assert sorted(c.borrower_keys()) == ["driver:2", "worker:1"], "never itself"
    clock.t += 1
    c.borrowers_checked({"worker:1": None, "driver:2": table(o)}, clock.t)  # worker:1 died
    assert not c.process(), "driver:2 still holds it"
    clock.t += 1
    c.borrowers_checked({"driver:2": table()}, clock.t)
    assert c.process().stored == [o]


def test_a_borrower_lists_whom_it_lent_to() -> None:
    w = RefCounter(track_borrows=True, me="worker:1")
    theirs, mine = oid(), oid()
    w.own_put(mine)
    w.born(theirs)
    w.lend([theirs, mine], "driver:2")
    assert w.lent_on() == {theirs: ["driver:2"]}, "only what it does not own (its own objects it follows itself)"
    doc = {"time": 0, "holds": [theirs.hex()], "lent": {theirs.hex(): ["driver:2"]}}
    t = read_table(json.dumps(doc).encode(), 0.0)
    assert t.lent == {theirs: frozenset(["driver:2"])}


def test_a_restartable_actors_constructor_arguments_stay_until_it_dies(clock: Clock) -> None:
    c = RefCounter(clock=clock)
    arg = oid()
    c.own_put(arg)
    c.born(arg)
    tid, (ret,) = task()
    actor = os.urandom(16)
    c.own_task(tid, [ret], [arg], [])
    c.died(arg)
    c.task_ended(tid, actor_id=actor, pin_for_actor=True)  # created; it may have to be created again
    assert not c.process(), "its constructor runs again with it after a restart"
    assert c.borrowing_actors() == [actor] and c.borrower_keys() == []
    c.actor_died(actor)
    assert c.process().stored == [arg]
