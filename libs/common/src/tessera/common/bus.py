"""NATS, with trace context carried across every hop.

:class:`Bus` wraps a nats-py connection. Every publish injects the W3C
``traceparent``/``tracestate`` headers (lowercase: NATS header keys are
case-sensitive) under a PRODUCER span; every delivery extracts them and runs the
handler under a CONSUMER span that is the publisher's child, so one user request
stays one trace across gRPC and NATS. Queue groups spread work across replicas;
JetStream streams with durable pull consumers carry work that must survive a
restart.

Subjects form a hierarchy: ``tessera.events.<table>.<op>`` for facts,
``tessera.<service>.<verb>`` for work. Tokens are checked by :func:`subject`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from tessera.common import errors

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("tessera.common.bus")
_meter = metrics.get_meter("tessera.common.bus")
# Messages in and out per subject (OTel messaging semconv). A subscription counts under the subject it was made
# with (wildcards and all) and a reply under "_INBOX", so the series stay as few as the subscriptions.
_sent = _meter.create_counter("messaging.client.sent.messages", unit="{message}",
                              description="Messages this process published on NATS")
_consumed = _meter.create_counter("messaging.client.consumed.messages", unit="{message}",
                                  description="Messages delivered to this process's NATS handlers")

Handler = Callable[[Msg], Awaitable[None]]

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+\Z")


def check_token(token: str, *, what: str = "subject token") -> str:
    """Return ``token`` if it can be one level of a subject, else raise InvalidArgumentError."""
    if not _TOKEN.match(token):
        raise errors.InvalidArgumentError(f"{what} {token!r} must be non-empty and use only letters, digits, '-' and '_'")
    return token


def subject(*tokens: str) -> str:
    """Join checked tokens into a subject: ``subject("tessera", "events", "kv")``."""
    return ".".join(check_token(t) for t in tokens)


def redact(url: str) -> str:
    """``url`` without the password it may carry (``nats://user:***@host:port``)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}" if ":" in userinfo else f"{scheme}://***@{hostpart}"


def _attrs(subj: str, op: str, size: int, queue: str | None = None) -> dict[str, Any]:
    a: dict[str, Any] = {
        "messaging.system": "nats",
        "messaging.destination.name": subj,
        "messaging.operation.type": op,
        "messaging.message.body.size": size,
    }
    if queue:
        a["messaging.consumer.group.name"] = queue
    return a


def _count(counter: metrics.Counter, destination: str, op: str, queue: str | None = None) -> None:
    a = {"messaging.system": "nats", "messaging.destination.name": destination, "messaging.operation.name": op}
    if queue:
        a["messaging.consumer.group.name"] = queue
    counter.add(1, a)


def _inject(headers: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(headers or {})
    propagate.inject(out)
    return out


class Bus:
    """A traced NATS connection. Create with :meth:`connect`; close with :meth:`close`."""

    def __init__(self, nc: NatsClient, *, request_timeout: float = 5.0) -> None:
        self.nc = nc
        self.request_timeout = request_timeout
        self._js: JetStreamContext | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reconnected: list[Callable[[], Any]] = []

    def on_reconnect(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` (a function, or a coroutine function) each time the connection comes back
        (subscriptions are in place again by then). Core NATS messages sent around an outage may be lost:
        this is where a service sends again what it is still waiting on."""
        self._reconnected.append(callback)

    async def _reconnected_cb(self) -> None:
        log.info("NATS reconnected")
        for cb in list(self._reconnected):
            try:
                r = cb()
                if asyncio.iscoroutine(r):
                    await r
            except Exception:
                log.exception("a NATS reconnect handler failed")

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str,
        connect_timeout: float = 2.0,
        retry_for: float = 0.0,
        request_timeout: float = 5.0,
        user: str = "",
        password: str = "",
    ) -> Bus:
        """Connect, reconnecting forever once connected.

        Args:
            url: NATS URL, e.g. ``nats://127.0.0.1:4222`` (``nats://user:password@host:port`` also works).
            name: connection name shown by the server (the service name).
            connect_timeout: seconds per connection attempt.
            retry_for: keep retrying the first connection this long (0: one attempt).
            request_timeout: default deadline of :meth:`request`.
            user, password: NATS user credentials (settings ``nats_user``, ``nats_password``).

        Raises:
            UnavailableError: no server answered in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_for
        credentials: dict[str, Any] = {"user": user, "password": password} if user else {}
        delay = 0.1
        while True:
            try:
                nc = NatsClient()
                bus = cls(nc, request_timeout=request_timeout)

                async def on_disconnect(nc: NatsClient = nc) -> None:
                    if not nc.is_closed:  # a deliberate close is no disconnect
                        log.warning("NATS disconnected; reconnecting")

                # with unlimited reconnects nats-py retries a first connection forever: bound it here
                await asyncio.wait_for(
                    nc.connect(
                        servers=[url],
                        name=name,
                        connect_timeout=connect_timeout,  # type: ignore[arg-type]  # seconds, annotated int
                        allow_reconnect=True,
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=0.5,  # type: ignore[arg-type]
                        error_cb=_on_error,
                        disconnected_cb=on_disconnect,
                        reconnected_cb=bus._reconnected_cb,
                        **credentials,
                    ),
                    timeout=max(connect_timeout, deadline - loop.time()),
                )
                return bus
            except (TimeoutError, OSError, nats.errors.Error) as e:
                try:
                    await nc.close()  # stop its reconnect loop
                except Exception as close_error:  # never connected: nothing to close
                    log.debug("closing a failed NATS connection: %r", close_error)
                if loop.time() + delay > deadline:
                    raise errors.UnavailableError(f"cannot connect to NATS at {redact(url)}: {e!r}") from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    # ------------------------------------------------------------------ core NATS

    async def publish(self, subj: str, data: bytes, *, headers: Mapping[str, str] | None = None) -> None:
        """Publish ``data`` on ``subj`` (at most once), under a PRODUCER span."""
        with _tracer.start_as_current_span(f"send {subj}", kind=SpanKind.PRODUCER, attributes=_attrs(subj, "send", len(data))):
            await self.nc.publish(subj, data, headers=_inject(headers))
        _count(_sent, subj, "publish")

    async def request(self, subj: str, data: bytes, *, timeout: float | None = None, headers: Mapping[str, str] | None = None) -> Msg:
        """Send a request and wait for one reply.

        Raises:
            NoRespondersError: nobody listens on ``subj``.
            DeadlineExceededError: no reply within ``timeout``.
        """
        timeout = self.request_timeout if timeout is None else timeout
        with _tracer.start_as_current_span(f"send {subj}", kind=SpanKind.PRODUCER, attributes=_attrs(subj, "send", len(data))) as span:
            _count(_sent, subj, "request")
            try:
                return await self.nc.request(subj, data, timeout=timeout, headers=_inject(headers))
            except nats.errors.NoRespondersError as e:
                span.set_status(Status(StatusCode.ERROR, "no responders"))
                raise errors.NoRespondersError(f"no service is listening on {subj}") from e
            except nats.errors.TimeoutError as e:
                span.set_status(Status(StatusCode.ERROR, "timeout"))
                raise errors.DeadlineExceededError(f"no reply on {subj} within {timeout:g}s") from e

    async def respond(self, msg: Msg, data: bytes) -> None:
        """Reply to a request (the reply carries the current trace context)."""
        if not msg.reply:
            raise errors.InvalidArgumentError("message has no reply subject")
        await self.nc.publish(msg.reply, data, headers=_inject(None))
        _count(_sent, "_INBOX", "reply")

    async def subscribe(self, subj: str, handler: Handler, *, queue: str | None = None) -> Subscription:
        """Deliver each message on ``subj`` (wildcards allowed) to ``handler``.

        With ``queue``, replicas sharing the queue name split the messages: each
        message goes to one of them. The handler runs under a CONSUMER span whose
        parent is the publisher's span. Returns once the server has the
        subscription: a message published after that, by anyone, is delivered.
        """

        async def cb(msg: Msg) -> None:
            _count(_consumed, subj, "process", queue)
            await _traced_delivery(msg, handler, queue=queue)

        sub = await self.nc.subscribe(subj, queue=queue or "", cb=cb)
        # nats-py's flush() writes its PING ahead of the SUB still queued for its flusher task,
        # so the first PONG can come back before the server has the subscription; the
        # second PING travels behind the SUB.
        await self.nc.flush()
        await self.nc.flush()
        return sub

    # ------------------------------------------------------------------ JetStream

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            self._js = self.nc.jetstream()
        return self._js

    async def ensure_stream(self, name: str, subjects: list[str], *, max_age_s: float | None = None) -> None:
        """Create the stream, or update its subjects if it exists (idempotent, safe across replicas)."""
        cfg = StreamConfig(name=name, subjects=subjects, max_age=max_age_s)
        try:
            await self.js.add_stream(cfg)
        except nats.js.errors.BadRequestError:
            await self.js.update_stream(cfg)

    async def js_publish(self, subj: str, data: bytes, *, msg_id: str | None = None, timeout: float | None = None) -> int:
        """Publish to a stream and wait for the ack; ``msg_id`` deduplicates. Returns the stream sequence."""
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        with _tracer.start_as_current_span(f"send {subj}", kind=SpanKind.PRODUCER, attributes=_attrs(subj, "send", len(data))):
            ack = await self.js.publish(subj, data, headers=_inject(headers), timeout=timeout or self.request_timeout)
            _count(_sent, subj, "publish")
            return int(ack.seq)

    def consume(
        self,
        subj: str,
        handler: Handler,
        *,
        durable: str,
        stream: str | None = None,
        batch: int = 10,
        ack_wait_s: float = 30.0,
        max_deliver: int = 5,
    ) -> asyncio.Task[None]:
        """Run a durable pull consumer: replicas with the same ``durable`` share the work.

        A message is acked only after ``handler`` returns; if it raises, the message is
        nak'ed and redelivered (up to ``max_deliver`` times). Cancel the task to stop.
        """
        check_token(durable, what="durable name")
        config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait_s, max_deliver=max_deliver)

        async def loop() -> None:
            try:
                await consume_until_cancelled()
            finally:
                # a fetch that timed out can leave a late status reply queued, which would hold up drain()
                if psub is not None:
                    try:
                        await psub.unsubscribe()
                    except Exception as unsub_error:
                        log.debug("unsubscribing %s: %r", durable, unsub_error)

        psub: JetStreamContext.PullSubscription | None = None

        async def consume_until_cancelled() -> None:
            nonlocal psub
            while True:
                try:
                    if psub is None:
                        psub = await self.js.pull_subscribe(subj, durable=durable, stream=stream, config=config)
                    msgs = await psub.fetch(batch, timeout=1.0)
                except TimeoutError:  # nothing to do (nats-py raises its own subclass or the builtin)
                    continue
                except nats.errors.ConnectionClosedError:
                    return
                except nats.errors.Error as e:  # JetStream unavailable for a while (restart, leader change): retry
                    log.warning("consumer %s on %s: %r; retrying", durable, subj, e)
                    if psub is not None:
                        try:
                            await psub.unsubscribe()
                        except Exception as unsub_error:
                            log.debug("unsubscribing %s: %r", durable, unsub_error)
                        psub = None
                    await asyncio.sleep(1.0)
                    continue
                for msg in msgs:
                    _count(_consumed, subj, "process", durable)
                    ok = await _traced_delivery(msg, handler, queue=durable)
                    try:
                        if ok:
                            await msg.ack()
                        else:
                            await msg.nak(delay=1.0)
                    except nats.errors.Error as e:  # not acked: redelivered after ack_wait
                        log.warning("could not ack %s: %r", msg.subject, e)

        task = asyncio.create_task(loop(), name=f"consume:{durable}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ lifecycle

    async def close(self, *, timeout: float = 5.0) -> None:
        """Stop consumers, drain subscriptions (pending messages are handled) and close."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # each drops its pull subscription
        if self.nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.drain(), timeout)
        except (TimeoutError, nats.errors.Error):
            await self.nc.close()


async def _traced_delivery(msg: Msg, handler: Handler, *, queue: str | None) -> bool:
    parent = propagate.extract(msg.headers or {})
    token = otel_context.attach(parent)
    try:
        with _tracer.start_as_current_span(
            f"process {msg.subject}", kind=SpanKind.CONSUMER, attributes=_attrs(msg.subject, "process", len(msg.data), queue)
        ) as span:
            try:
                await handler(msg)
                return True
            except Exception as e:  # a bad message must not kill the subscription
                span.record_exception(e)
                span.set_status(Status(StatusCode.ERROR, str(e)))
                log.exception("handler for %s failed", msg.subject)
                return False
    finally:
        otel_context.detach(token)


async def _on_error(e: Exception) -> None:
    log.warning("NATS error: %r", e)

