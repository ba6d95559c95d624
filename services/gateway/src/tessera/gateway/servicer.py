"""gRPC side of the gateway: every call that reaches it is forwarded, as bytes, to the replica routes.py
picks, streams included, with its metadata, deadline and trace context; the replica's status, details
and trailing metadata come back as they are.

The gateway neither decodes nor re-encodes messages, so it serves any method of any service (and of
versions it was not built with). The token the caller sent travels on to the replica, which checks it
(the gateway's own server checks it first when authentication is on).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
from opentelemetry import propagate

from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.control_store.v1 import control_store_pb2_grpc as cpb_grpc
from tessera.common import rpc
from tessera.gateway.routes import Replica, RouteError, RouteTable

log = logging.getLogger(__name__)

#: A stale route table is listed again at most this often (a call naming an unknown replica waits for it).
REFRESH_MIN_S = 0.5
#: How often the table is listed in the background.
REFRESH_EVERY_S = 5.0
#: Metadata the gateway sets itself, or gRPC does: never forwarded as received.
_DROP = {rpc.ROUTE_HEADER, "traceparent", "tracestate", "user-agent", "content-type", "te", "grpc-timeout",
         "grpc-accept-encoding", "grpc-encoding", "accept-encoding"}
_OWN = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Directory:
    """The route table, kept fresh from the control store's instance list."""

    def __init__(self, table: RouteTable, stub: cpb_grpc.ControlStoreServiceStub) -> None:
        self.table = table
        self._stub = stub
        self._listed = 0.0
        self._lock = asyncio.Lock()

    async def refresh(self, *, force: bool = False) -> None:
        async with self._lock:
            if not force and time.monotonic() - self._listed < REFRESH_MIN_S:
                return
            resp = await self._stub.ListInstances(cpb.ListInstancesRequest(), timeout=5.0)
            self.table.update(Replica(i.service, i.address, i.http_address) for i in resp.instances)
            self._listed = time.monotonic()

    async def resolve(self, route: str, method: str) -> str:
        try:
            return self.table.resolve(route, method)
        except RouteError:
            await self.refresh()  # a replica that registered since the last listing
            return self.table.resolve(route, method)

    async def pick_http(self) -> str:
        try:
            return self.table.pick("serving", http=True).http_address
        except RouteError:
            await self.refresh()
            return self.table.pick("serving", http=True).http_address

    async def run(self) -> None:
        while True:
            try:
                await self.refresh(force=True)
            except grpc.aio.AioRpcError as e:
                log.warning("could not list the replicas: %s", e.details())
            await asyncio.sleep(REFRESH_EVERY_S)


class Forwarder(grpc.GenericRpcHandler):
    """The catch-all handler: any method, forwarded. Health and reflection calls naming no replica are the
    gateway's own (so health checks and ``grpcurl`` work against the gateway itself)."""

    def __init__(self, directory: Directory, *, max_message_bytes: int) -> None:
        self.directory = directory
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes),
                         ("grpc.keepalive_time_ms", 30_000)]
        self.forwarded = 0

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        routed = any(k == rpc.ROUTE_HEADER for k, _ in details.invocation_metadata or ())
        if not routed and method.startswith(_OWN):
            return None  # the gateway's own health and reflection servicers answer

        async def forward(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            async for resp in self._forward(method, requests, context):
                yield resp

        return grpc.stream_stream_rpc_method_handler(forward)

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:  # TLS as configured; the gateway itself routes through no gateway (server.py checks)
            ch = self._channels[address] = rpc.raw_aio_channel(address, self._options)
        return ch

    async def _target(self, route: str, method: str) -> tuple[str, str]:
        """(address, "") or ("", why not)."""
        try:
            return await self.directory.resolve(route, method), ""
        except RouteError as e:
            return "", f"gateway: {e}"
        except grpc.aio.AioRpcError as e:
            return "", f"gateway: the control store did not answer: {e.details()}"

    async def _forward(self, method: str, requests: AsyncIterator[bytes],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        md = context.invocation_metadata() or ()
        route = next((str(v) for k, v in md if k == rpc.ROUTE_HEADER), "")
        target, why = await self._target(route, method)
        if not target:
            await context.abort(grpc.StatusCode.UNAVAILABLE, why)
            return
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # the gateway's server span: client → gateway → replica in one trace
        out: list[tuple[str, Any]] = [(k, v) for k, v in md if k not in _DROP and not k.startswith(":")]
        out.extend(carrier.items())
        remaining = context.time_remaining()
        call = self._channel(target).stream_stream(method)(
            requests, metadata=tuple(out), timeout=remaining if remaining is not None and remaining < 1e8 else None)
        self.forwarded += 1
        try:
            async for resp in call:
                yield resp
            code = await call.code()
        except grpc.aio.AioRpcError as e:
            code = e.code()
            await _finish(context, code, e.details() or "", e.trailing_metadata(), target)
            return
        finally:
            if not call.done():
                call.cancel()
        if code != grpc.StatusCode.OK:
            await _finish(context, code, await call.details() or "", await call.trailing_metadata(), target)
            return
        trailing = await call.trailing_metadata()
        if trailing:
            context.set_trailing_metadata(tuple(trailing))

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


async def _finish(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str, trailing: Any,
                  target: str) -> None:
    if code == grpc.StatusCode.UNAVAILABLE and not details.startswith("gateway"):
        details = f"{details} (through the gateway, at {target})"
    await context.abort(code, details, trailing_metadata=tuple(trailing or ()))

