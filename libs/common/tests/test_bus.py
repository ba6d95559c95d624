from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from tessera.common import bus as busmod
from tessera.common.bus import Bus, check_token, subject
from tessera.common.errors import DeadlineExceededError, InvalidArgumentError, NoRespondersError, UnavailableError
from tessera.common.procs import free_port


def _uid() -> str:
    return uuid.uuid4().hex[:12]


async def _until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_url, name="test-bus")
    yield b
    await b.close()


@pytest.fixture
async def bus2(nats_url: str) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_url, name="test-bus-2")
    yield b
    await b.close()


# ------------------------------------------------------------------ subjects


def test_subject_joins_checked_tokens() -> None:
    assert subject("tessera", "events", "kv") == "tessera.events.kv"
    assert subject("tessera", "task-scheduler", "submit_v2") == "tessera.task-scheduler.submit_v2"
    assert check_token("A-z_09") == "A-z_09"


@pytest.mark.parametrize("bad", ["", "a.b", "*", ">", "a b", "ü", "a\n"])
def test_subject_rejects_bad_tokens(bad: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        subject("tessera", bad)
    assert repr(bad) in str(e.value)
    assert "subject token" in str(e.value)
    with pytest.raises(InvalidArgumentError, match="durable name"):
        check_token(bad, what="durable name")


# ------------------------------------------------------------------ core NATS


async def test_connect_to_nothing_is_unavailable() -> None:
    port = free_port()
    with pytest.raises(UnavailableError, match=f"cannot connect to NATS at nats://127.0.0.1:{port}"):
        await Bus.connect(f"nats://127.0.0.1:{port}", name="nobody", connect_timeout=0.5)


async def test_publish_subscribe(bus: Bus, bus2: Bus) -> None:
    subj = f"test.ps.{_uid()}"
    got: list[tuple[str, bytes, dict[str, str]]] = []

    async def handler(msg: Msg) -> None:
        got.append((msg.subject, msg.data, dict(msg.headers or {})))

    await bus2.subscribe(f"{subj}.*", handler)
    assert bus.connected
    await bus.publish(f"{subj}.a", b"one", headers={"x-extra": "1"})
    await bus.publish(f"{subj}.b", b"two")
    await bus.publish(f"other.{subj}", b"not for us")
    await _until(lambda: len(got) >= 2, what="two messages")
    await asyncio.sleep(0.05)
    assert [(s, d) for s, d, _ in got] == [(f"{subj}.a", b"one"), (f"{subj}.b", b"two")]
    assert got[0][2]["x-extra"] == "1"


async def test_queue_group_delivers_each_message_once(bus: Bus, bus2: Bus, nats_url: str) -> None:
    subj = f"test.q.{_uid()}"
    a: list[bytes] = []
    b: list[bytes] = []

    async def on_a(msg: Msg) -> None:
        a.append(msg.data)

    async def on_b(msg: Msg) -> None:
        b.append(msg.data)

    await bus.subscribe(subj, on_a, queue="workers")
    await bus2.subscribe(subj, on_b, queue="workers")
    sender = await Bus.connect(nats_url, name="sender")
    try:
        n = 100
        for i in range(n):
            await sender.publish(subj, str(i).encode())
        await sender.nc.flush()
        await _until(lambda: len(a) + len(b) >= n, what="all queue messages")
        await asyncio.sleep(0.1)  # nothing more may arrive
    finally:
        await sender.close()
    assert sorted(int(x) for x in a + b) == list(range(n))  # each once, none twice
    assert a and b, "both members of the queue group must get a share"


async def test_request_reply(bus: Bus, bus2: Bus) -> None:
    subj = f"test.rr.{_uid()}"

    async def echo(msg: Msg) -> None:
        await bus2.respond(msg, b"echo:" + msg.data)

    await bus2.subscribe(subj, echo, queue="echo")
    reply = await bus.request(subj, b"hi", timeout=2.0)
    assert reply.data == b"echo:hi"


async def test_request_with_no_responders(bus: Bus) -> None:
    subj = f"test.none.{_uid()}"
    with pytest.raises(NoRespondersError, match=f"no service is listening on {subj}") as e:
        await bus.request(subj, b"hello", timeout=2.0)
    assert isinstance(e.value, UnavailableError) and e.value.code == "UNAVAILABLE"


async def test_request_timeout(bus: Bus, bus2: Bus) -> None:
    subj = f"test.slow.{_uid()}"

    async def silent(msg: Msg) -> None:
        return None

    await bus2.subscribe(subj, silent)
    with pytest.raises(DeadlineExceededError, match=f"no reply on {subj} within 0.2s"):
        await bus.request(subj, b"x", timeout=0.2)


async def test_respond_needs_a_reply_subject(bus: Bus, bus2: Bus) -> None:
    subj = f"test.noreply.{_uid()}"
    errors: list[BaseException] = []

    async def handler(msg: Msg) -> None:
        try:
            await bus2.respond(msg, b"x")
        except InvalidArgumentError as e:
            errors.append(e)

    await bus2.subscribe(subj, handler)
    await bus.publish(subj, b"fire and forget")
    await _until(lambda: bool(errors), what="the handler")
    assert "no reply subject" in str(errors[0])


async def test_a_failing_handler_does_not_kill_the_subscription(bus: Bus, bus2: Bus) -> None:
    subj = f"test.fail.{_uid()}"
    seen: list[bytes] = []

    async def handler(msg: Msg) -> None:
        seen.append(msg.data)
        if msg.data == b"bad":
            raise RuntimeError("boom")

    await bus2.subscribe(subj, handler)
    await bus.publish(subj, b"bad")
    await bus.publish(subj, b"good")
    await _until(lambda: len(seen) == 2, what="both messages")
    assert seen == [b"bad", b"good"]


# ------------------------------------------------------------------ JetStream


async def test_jetstream_consume_redelivers_until_acked(bus: Bus, bus2: Bus) -> None:
    u = _uid()
    stream, subj = f"TEST_{u}", f"test.js.{u}"
    await bus.ensure_stream(stream, [f"{subj}.>"])
    await bus.ensure_stream(stream, [f"{subj}.>"])  # idempotent
    seq1 = await bus.js_publish(f"{subj}.work", b"flaky", msg_id=f"{u}-1")
    seq2 = await bus.js_publish(f"{subj}.work", b"fine", msg_id=f"{u}-2")
    assert seq2 == seq1 + 1
    # the same msg_id is deduplicated: the stream keeps one copy
    assert await bus.js_publish(f"{subj}.work", b"fine", msg_id=f"{u}-2") == seq2

    deliveries: list[tuple[bytes, int]] = []
    done = asyncio.Event()

    async def handler(msg: Msg) -> None:
        deliveries.append((msg.data, msg.metadata.num_delivered))
        if msg.data == b"flaky" and msg.metadata.num_delivered == 1:
            raise RuntimeError("transient failure")
        if sum(1 for d, _ in deliveries if d == b"flaky") == 2:
            done.set()

    task = bus2.consume(f"{subj}.>", handler, durable=f"worker_{u}", stream=stream, ack_wait_s=10)
    await asyncio.wait_for(done.wait(), 10)
    await _until(lambda: len(deliveries) >= 3, what="all deliveries")

    async def settled() -> bool:
        info = await bus.js.consumer_info(stream, f"worker_{u}")
        return info.num_ack_pending == 0 and info.num_pending == 0 and info.num_redelivered == 0

    deadline = asyncio.get_running_loop().time() + 5
    while not await settled():
        assert asyncio.get_running_loop().time() < deadline, "messages were not acked"
        await asyncio.sleep(0.05)
    task.cancel()
    assert sorted(deliveries) == [(b"fine", 1), (b"flaky", 1), (b"flaky", 2)]
    info = await bus.js.consumer_info(stream, f"worker_{u}")
    assert info.delivered.stream_seq == seq2
    assert info.ack_floor.stream_seq == seq2


async def test_jetstream_durable_shares_work_and_survives_restart(bus: Bus, nats_url: str) -> None:
    u = _uid()
    stream, subj, durable = f"TEST_{u}", f"test.jd.{u}", f"durable_{u}"
    await bus.ensure_stream(stream, [subj])
    got: list[bytes] = []

    async def handler(msg: Msg) -> None:
        got.append(msg.data)

    other = await Bus.connect(nats_url, name="consumer")
    task = other.consume(subj, handler, durable=durable, stream=stream)
    await bus.js_publish(subj, b"1")
    await _until(lambda: got == [b"1"], what="first message")
    await other.close()
    assert task.cancelled() or task.done()
    # published while no consumer runs: the durable delivers it on the next start
    await bus.js_publish(subj, b"2")
    again = await Bus.connect(nats_url, name="consumer")
    try:
        again.consume(subj, handler, durable=durable, stream=stream)
        await _until(lambda: got == [b"1", b"2"], what="the message published while stopped")
    finally:
        await again.close()
        await bus.js.delete_stream(stream)


async def test_ensure_stream_updates_subjects(bus: Bus) -> None:
    u = _uid()
    stream = f"TEST_{u}"
    await bus.ensure_stream(stream, [f"test.a.{u}"])
    await bus.ensure_stream(stream, [f"test.a.{u}", f"test.b.{u}"], max_age_s=60)
    info = await bus.js.stream_info(stream)
    assert sorted(info.config.subjects or []) == sorted([f"test.a.{u}", f"test.b.{u}"])
    assert await bus.js_publish(f"test.b.{u}", b"x") == 1
    await bus.js.delete_stream(stream)


async def test_consumer_survives_jetstream_errors(bus: Bus, bus2: Bus) -> None:
    u = _uid()
    stream, subj = f"TEST_{u}", f"test.jr.{u}"
    await bus.ensure_stream(stream, [subj])
    got: list[bytes] = []

    async def handler(msg: Msg) -> None:
        got.append(msg.data)

    task = bus2.consume(subj, handler, durable=f"d_{u}", stream=stream)
    await bus.js_publish(subj, b"before")
    await _until(lambda: got == [b"before"], what="first message")
    # the stream (and its consumer) vanish: fetches fail with JetStream errors for a while
    await bus.js.delete_stream(stream)
    await asyncio.sleep(1.2)
    assert not task.done(), "the consumer loop must not die on a JetStream error"
    await bus.ensure_stream(stream, [subj])
    await bus.js_publish(subj, b"after")
    await _until(lambda: got == [b"before", b"after"], timeout=8, what="delivery after recovery")
    assert not task.done()


async def test_close_is_prompt_with_an_idle_consumer(bus: Bus, nats_url: str) -> None:
    u = _uid()
    stream, subj = f"TEST_{u}", f"test.idle.{u}"
    await bus.ensure_stream(stream, [subj])
    got = asyncio.Event()

    async def handler(msg: Msg) -> None:
        got.set()

    worker = await Bus.connect(nats_url, name="idle-worker")
    task = worker.consume(subj, handler, durable=f"d_{u}", stream=stream)
    await bus.js_publish(subj, b"x")
    await asyncio.wait_for(got.wait(), 5)
    await asyncio.sleep(1.3)  # idle: at least one fetch times out
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await worker.close()
    assert loop.time() - t0 < 1.0, "close() waited for the drain timeout"
    assert task.done() and worker.nc.is_closed


def test_consume_checks_durable_name() -> None:
    b = Bus(None, request_timeout=1.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="durable name 'a.b'"):
        b.consume("x", _noop, durable="a.b")


async def _noop(msg: Msg) -> None:
    return None


# ------------------------------------------------------------------ trace context


async def test_consumer_span_is_child_of_producer_span(bus: Bus, bus2: Bus, spans) -> None:  # type: ignore[no-untyped-def]
    subj = f"test.trace.{_uid()}"
    inside: list[tuple[int, int]] = []

    async def handler(msg: Msg) -> None:
        ctx = trace.get_current_span().get_span_context()
        inside.append((ctx.trace_id, ctx.span_id))
        assert "traceparent" in (msg.headers or {})

    await bus2.subscribe(subj, handler, queue="traced")
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("user request") as root:
        await bus.publish(subj, b"payload")
    await _until(lambda: bool(inside), what="delivery")

    done = spans.finished()
    producer = [s for s in done if s.kind == SpanKind.PRODUCER and s.name == f"send {subj}"]
    consumer = [s for s in done if s.kind == SpanKind.CONSUMER and s.name == f"process {subj}"]
    assert len(producer) == 1 and len(consumer) == 1, [s.name for s in done]
    p, c = producer[0], consumer[0]
    assert p.parent is not None and p.parent.span_id == root.get_span_context().span_id
    assert c.parent is not None and c.parent.span_id == p.context.span_id
    assert c.context.trace_id == p.context.trace_id == root.get_span_context().trace_id
    assert inside == [(c.context.trace_id, c.context.span_id)]  # the handler runs inside the CONSUMER span
    assert p.attributes["messaging.system"] == "nats"
    assert p.attributes["messaging.destination.name"] == subj
    assert p.attributes["messaging.message.body.size"] == len(b"payload")
    assert c.attributes["messaging.consumer.group.name"] == "traced"
    assert p.resource.attributes["service.namespace"] == "tessera"


async def test_request_reply_and_failures_are_traced(bus: Bus, bus2: Bus, spans) -> None:  # type: ignore[no-untyped-def]
    subj = f"test.trace-rr.{_uid()}"

    async def handler(msg: Msg) -> None:
        if msg.data == b"fail":
            raise ValueError("bad input")
        await bus2.respond(msg, b"ok")

    await bus2.subscribe(subj, handler)
    assert (await bus.request(subj, b"go", timeout=2)).data == b"ok"
    await bus.publish(subj, b"fail")
    none_subj = f"test.trace-none.{_uid()}"
    with pytest.raises(NoRespondersError):
        await bus.request(none_subj, b"x", timeout=2)

    async def two_consumers() -> bool:
        return len([s for s in spans.finished() if s.name == f"process {subj}"]) == 2

    deadline = asyncio.get_running_loop().time() + 5
    while not await two_consumers():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    done = spans.finished()
    sends = {s.context.span_id: s for s in done if s.name == f"send {subj}"}
    processes = [s for s in done if s.name == f"process {subj}"]
    assert len(sends) == 2
    for c in processes:
        assert c.parent is not None and c.parent.span_id in sends
        assert c.context.trace_id == sends[c.parent.span_id].context.trace_id
    failed = [c for c in processes if c.status.status_code == StatusCode.ERROR]
    assert len(failed) == 1 and "bad input" in (failed[0].status.description or "")
    assert any(e.name == "exception" for e in failed[0].events)
    no_resp = [s for s in done if s.name == f"send {none_subj}"]
    assert len(no_resp) == 1 and no_resp[0].status.status_code == StatusCode.ERROR


async def test_jetstream_delivery_continues_the_trace(bus: Bus, bus2: Bus, spans) -> None:  # type: ignore[no-untyped-def]
    u = _uid()
    stream, subj = f"TEST_{u}", f"test.jt.{u}"
    await bus.ensure_stream(stream, [subj])
    got = asyncio.Event()

    async def handler(msg: Msg) -> None:
        got.set()

    bus2.consume(subj, handler, durable=f"d_{u}", stream=stream)
    await bus.js_publish(subj, b"x")
    await asyncio.wait_for(got.wait(), 10)
    await asyncio.sleep(0.05)
    done = spans.finished()
    p = [s for s in done if s.name == f"send {subj}"]
    c = [s for s in done if s.name == f"process {subj}"]
    assert len(p) == 1 and len(c) == 1
    assert c[0].parent is not None and c[0].parent.span_id == p[0].context.span_id
    assert c[0].context.trace_id == p[0].context.trace_id


def test_attrs_without_queue() -> None:
    a = busmod._attrs("s", "send", 3)
    assert "messaging.consumer.group.name" not in a and a["messaging.operation.type"] == "send"


_: Callable[[Msg], Awaitable[None]] = _noop


async def test_reconnect_handlers_run_when_the_server_comes_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tessera.testing import nats_server

    with nats_server(tmp_path) as server:
        b = await Bus.connect(server.url, name="reconnecting")
        calls: list[str] = []

        async def coro() -> None:
            calls.append("coroutine")

        b.on_reconnect(lambda: calls.append("function"))
        b.on_reconnect(lambda: 1 / 0)  # a failing handler is logged; the others still run
        b.on_reconnect(coro)
        got: list[bytes] = []

        async def handler(msg: Msg) -> None:
            got.append(msg.data)

        await b.subscribe("test.reconnect", handler)
        try:
            server.kill()
            server.restart()  # the fixture stops the new process, whatever happens below
            await _until(lambda: calls == ["function", "coroutine"], what="the reconnect handlers")
            await b.publish("test.reconnect", b"after")  # the subscription is back when the handlers run
            await _until(lambda: got == [b"after"], what="a message after the reconnect")
        finally:
            await b.close()
