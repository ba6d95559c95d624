from __future__ import annotations

import hashlib

import pytest

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.common import ids
from tessera.common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from tessera.control_store.store import ControlStore

# ------------------------------------------------------------------ jobs


async def test_create_and_get_job(store: ControlStore, clock, published) -> None:  # type: ignore[no-untyped-def]
    jid = ids.new_id("job_id")
    rec = await store.create_job(pb.JobInfo(job_id=jid, entrypoint="python train.py", metadata={"user": "ada"}))
    assert rec.state == pb.JOB_STATE_RUNNING and rec.start_ms == clock.now_ms and rec.end_ms == 0
    assert await store.get_job(jid) == rec
    assert rec in await store.list_jobs()
    assert published.subjects() == ["tessera.events.jobs.created"]
    assert pb.JobInfo.FromString(published.events[0][1].changes[0].value) == rec


async def test_duplicate_job(store: ControlStore, snapshot) -> None:  # type: ignore[no-untyped-def]
    jid = ids.new_id("job_id")
    await store.create_job(pb.JobInfo(job_id=jid, entrypoint="a"))
    before = snapshot()
    with pytest.raises(AlreadyExistsError, match=f"^job {jid.hex()} already exists$"):
        await store.create_job(pb.JobInfo(job_id=jid, entrypoint="b"))
    assert snapshot() == before
    assert (await store.get_job(jid)).entrypoint == "a"


async def test_create_job_rejects_bad_input(store: ControlStore, snapshot) -> None:  # type: ignore[no-untyped-def]
    before = snapshot()
    with pytest.raises(InvalidArgumentError, match="^job.job_id must be 4 bytes, got 16 bytes$"):
        await store.create_job(pb.JobInfo(job_id=ids.new_id("task_id")))
    with pytest.raises(InvalidArgumentError, match="a new job must be RUNNING, got JOB_STATE_SUCCEEDED"):
        await store.create_job(pb.JobInfo(job_id=ids.new_id("job_id"), state=pb.JOB_STATE_SUCCEEDED))
    assert snapshot() == before


async def test_job_state_transitions(store: ControlStore, clock, published) -> None:  # type: ignore[no-untyped-def]
    jid = ids.new_id("job_id")
    await store.create_job(pb.JobInfo(job_id=jid))
    clock.advance(1_000)
    same = await store.update_job_state(jid, pb.JOB_STATE_RUNNING)  # no-op: legal
    assert same.state == pb.JOB_STATE_RUNNING and same.end_ms == 0
    clock.advance(1_000)
    done = await store.update_job_state(jid, pb.JOB_STATE_SUCCEEDED, "all good")
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.message == "all good" and done.end_ms == clock.now_ms
    assert published.subjects()[-1] == "tessera.events.jobs.updated"
    for illegal in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_FAILED, pb.JOB_STATE_STOPPED):
        with pytest.raises(FailedPreconditionError,
                           match=f"job {jid.hex()}: illegal transition JOB_STATE_SUCCEEDED -> {pb.JobState.Name(illegal)}"):
            await store.update_job_state(jid, illegal)
    assert await store.get_job(jid) == done


async def test_job_state_bad_input(store: ControlStore) -> None:
    jid = ids.new_id("job_id")
    await store.create_job(pb.JobInfo(job_id=jid))
    with pytest.raises(InvalidArgumentError, match="job state must be one of JOB_STATE_RUNNING, .*got JOB_STATE_UNSPECIFIED"):
        await store.update_job_state(jid, pb.JOB_STATE_UNSPECIFIED)
    with pytest.raises(InvalidArgumentError, match="got 99"):
        await store.update_job_state(jid, 99)
    missing = ids.new_id("job_id")
    with pytest.raises(NotFoundError, match=f"job {missing.hex()} not found"):
        await store.update_job_state(missing, pb.JOB_STATE_FAILED)
    with pytest.raises(NotFoundError, match=f"job {missing.hex()} not found"):
        await store.get_job(missing)
    assert (await store.get_job(jid)).state == pb.JOB_STATE_RUNNING


# ------------------------------------------------------------------ functions


async def test_function_id_is_the_content_hash(store: ControlStore, clock, published) -> None:  # type: ignore[no-untyped-def]
    jid = ids.new_id("job_id")
    code = b"def f(x):\n    return x + 1\n"
    fid, created = await store.export_function(jid, "mod.f", code)
    assert fid == hashlib.sha256(code).digest() and created
    rec = await store.get_function(fid)
    assert (rec.function_id, rec.job_id, rec.name, rec.code, rec.created_ms) == (fid, jid, "mod.f", code, clock.now_ms)
    assert published.subjects() == ["tessera.events.functions.created"]
    # the same code again (from any job) is the same function: nothing new is written or announced
    clock.advance(5)
    assert await store.export_function(ids.new_id("job_id"), "other.name", code) == (fid, False)
    assert await store.get_function(fid) == rec
    assert published.subjects() == ["tessera.events.functions.created"]
    assert await store.export_function(b"", "mod.f", code, expected=fid) == (fid, False)


async def test_expected_function_id_mismatch(store: ControlStore, snapshot) -> None:  # type: ignore[no-untyped-def]
    before = snapshot()
    code = b"print('hi')"
    wrong = hashlib.sha256(b"something else").digest()
    with pytest.raises(InvalidArgumentError,
                       match=f"expected_function_id {wrong.hex()} does not match sha256\\(code\\) {hashlib.sha256(code).hexdigest()}"):
        await store.export_function(b"", "x", code, expected=wrong)
    with pytest.raises(InvalidArgumentError, match="code is empty"):
        await store.export_function(b"", "x", b"")
    with pytest.raises(InvalidArgumentError, match="job_id must be 4 bytes, got 2 bytes"):
        await store.export_function(b"ab", "x", code)
    assert snapshot() == before
    with pytest.raises(NotFoundError, match=f"function {hashlib.sha256(code).hexdigest()} not found"):
        await store.get_function(hashlib.sha256(code).digest())
    with pytest.raises(InvalidArgumentError, match="function_id must be 32 bytes, got 16 bytes"):
        await store.get_function(ids.new_id("task_id"))
