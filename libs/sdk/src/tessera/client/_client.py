from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.api.control_store.v1 import control_store_pb2_grpc as pb_grpc
from tessera.client._discovery import find_cluster
from tessera.common.registry import control_store_stub
from tessera.common.rpc import stream_channel, trace_metadata


def _op_name(op: int) -> str:
    """CHANGE_OP_CREATED -> "created"."""
    if op not in pb.ChangeOp.values():
        return "unknown"
    return pb.ChangeOp.Name(op).removeprefix("CHANGE_OP_").lower()  # type: ignore[arg-type]


@dataclass(frozen=True)
class Event:
    """One change of one record, as seen by :meth:`Client.watch`."""

    table: str
    op: str  # created | updated | deleted | dead | sealed | evicted | spilled | restored | lost
    key: bytes
    value: bytes
    namespace: str = ""


class Client:
    """A blocking client of the control store. Thread-safe; close it (or use ``with``) when done.

    Args:
        address: host:port of the control store; default: ``TESSERA_ADDRESS`` or the local ``tessera up`` cluster.
        timeout: deadline, in seconds, of every call that is not given one.
    """

    def __init__(self, address: str | None = None, *, timeout: float = 10.0) -> None:
        self.cluster = find_cluster(address)
        self.address = self.cluster.control_store_address
        self.timeout = timeout
        self._channel, self._stub = control_store_stub(self.address, timeout=timeout)
        self._streams = stream_channel(self.address)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()
        self._streams.close()

    # key-value -------------------------------------------------------------------
    def kv_put(self, namespace: str, key: bytes, value: bytes, *, overwrite: bool = True,
               timeout: float | None = None) -> bool:
        """Store ``value``; returns True if the key was new. ``overwrite=False`` raises ALREADY_EXISTS instead."""
        req = pb.KvPutRequest(namespace=namespace, key=key, value=value, overwrite=overwrite)
        return bool(self._stub.KvPut(req, timeout=timeout or self.timeout).created)

    def kv_get(self, namespace: str, key: bytes, *, timeout: float | None = None) -> bytes:
        """The value of ``key``; grpc.RpcError NOT_FOUND if absent."""
        return bytes(self._stub.KvGet(pb.KvGetRequest(namespace=namespace, key=key), timeout=timeout or self.timeout).value)

    def kv_delete(self, namespace: str, key: bytes, *, timeout: float | None = None) -> bool:
        req = pb.KvDeleteRequest(namespace=namespace, key=key)
        return bool(self._stub.KvDelete(req, timeout=timeout or self.timeout).deleted)

    def kv_list(self, namespace: str, prefix: bytes = b"", *, timeout: float | None = None) -> list[bytes]:
        req = pb.KvListRequest(namespace=namespace, prefix=prefix)
        return list(self._stub.KvList(req, timeout=timeout or self.timeout).keys)

    # cluster ---------------------------------------------------------------------
    def nodes(self, *, timeout: float | None = None) -> list[pb.NodeInfo]:
        return list(self._stub.ListNodes(pb.ListNodesRequest(), timeout=timeout or self.timeout).nodes)

    def instances(self, service: str = "", *, timeout: float | None = None) -> list[pb.ServiceInstance]:
        """The service replicas registered right now."""
        req = pb.ListInstancesRequest(service=service)
        return list(self._stub.ListInstances(req, timeout=timeout or self.timeout).instances)

    @property
    def stub(self) -> object:
        """The raw ControlStoreService stub, for the calls this facade does not wrap."""
        return self._stub

    # change feed -----------------------------------------------------------------
    def watch(self, table: str, *, namespace: str = "", timeout: float | None = None,
              ready: threading.Event | None = None) -> Iterator[Event]:
        """Yield changes of ``table`` (and kv ``namespace``) as they happen, until ``timeout`` seconds pass.

        ``ready`` is set once the subscription is in place, so a change made after
        that is never missed. Leaving the loop cancels the stream.
        """
        stub = pb_grpc.ControlStoreServiceStub(self._streams)
        call = stub.Watch(pb.WatchRequest(table=table, namespace=namespace), timeout=timeout, metadata=trace_metadata())
        try:
            call.initial_metadata()  # raises the status if the request was refused
            if ready is not None:
                ready.set()
            for resp in call:
                ev = resp.event
                for ch in ev.changes:
                    yield Event(ev.table, _op_name(ev.op), bytes(ch.key), bytes(ch.value), ev.namespace)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                raise
        finally:
            call.cancel()


def connect(address: str | None = None, *, timeout: float = 10.0) -> Client:
    """Connect to a cluster (see :class:`Client`)."""
    return Client(address, timeout=timeout)
