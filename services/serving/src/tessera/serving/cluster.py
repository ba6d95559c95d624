"""Where the cluster keeps pipelines: the registry in the control store, parameters in
the object store.

- Registry: the control store's KV namespace ``serving-pipelines`` (name -> PipelineSpec).
  The control store announces every change on NATS (``tessera.events.kv.serving-pipelines.*``),
  which every replica follows.
- Parameters: each array is one object in the node's object store; the KV namespace
  ``serving-params`` maps its content hash to the object id. A replica reads it as a
  read-only view of the node's shared memory (no copy, mapped once per node).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import grpc
import grpc.aio
import numpy as np

from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.control_store.v1 import control_store_pb2_grpc as cpb_grpc
from tessera.api.serving.v1 import serving_pb2 as pb
from tessera.common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from tessera.common.ids import OBJECT_ID_LEN
from tessera.exceptions import ObjectStoreFullError

log = logging.getLogger(__name__)

PIPELINES = "serving-pipelines"
PARAMS = "serving-params"


class ClusterStore:
    def __init__(self, stub: cpb_grpc.ControlStoreServiceStub, *, timeout: float = 10.0) -> None:
        self.stub = stub
        self.timeout = timeout
        self._objects: Any = None
        self._objects_lock = asyncio.Lock()
        self._capacity: int | None = None

    # ------------------------------------------------------------------ registry
    async def put_pipeline(self, spec: pb.PipelineSpec, *, replace: bool) -> None:
        req = cpb.KvPutRequest(namespace=PIPELINES, key=spec.name.encode(), value=spec.SerializeToString(),
                               overwrite=replace)
        await self.stub.KvPut(req, timeout=self.timeout)

    async def get_pipeline(self, name: str) -> pb.PipelineSpec | None:
        try:
            resp = await self.stub.KvGet(cpb.KvGetRequest(namespace=PIPELINES, key=name.encode()), timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise UnavailableError(f"control store: {e.code().name} {e.details()}") from e
        return pb.PipelineSpec.FromString(resp.value)

    async def delete_pipeline(self, name: str) -> bool:
        resp = await self.stub.KvDelete(cpb.KvDeleteRequest(namespace=PIPELINES, key=name.encode()), timeout=self.timeout)
        return bool(resp.deleted)

    async def pipeline_names(self) -> list[str]:
        resp = await self.stub.KvList(cpb.KvListRequest(namespace=PIPELINES), timeout=self.timeout)
        return [k.decode() for k in resp.keys]

    # ------------------------------------------------------------------ parameters
    async def _client(self) -> Any:
        async with self._objects_lock:
            if self._objects is None:
                resp = await self.stub.ListInstances(cpb.ListInstancesRequest(service="object-store"),
                                                     timeout=self.timeout)
                here = os.uname().nodename
                insts = [i for i in resp.instances if i.hostname == here] or list(resp.instances)
                if not insts:
                    raise UnavailableError("no object store is registered in the cluster")
                from tessera.client.objects import open_object_client

                addr = insts[0].address
                self._objects = await asyncio.to_thread(open_object_client, addr, name="serving", durable=True)
                log.info("parameters in the object store at %s", addr)
            return self._objects

    async def object_id(self, h: str) -> bytes | None:
        try:
            resp = await self.stub.KvGet(cpb.KvGetRequest(namespace=PARAMS, key=h.encode()), timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise UnavailableError(f"control store: {e.code().name} {e.details()}") from e
        return bytes(resp.value)

    async def missing(self, hashes: list[str]) -> list[str]:
        found = await asyncio.gather(*(self.object_id(h) for h in hashes))
        known = {h: oid for h, oid in zip(hashes, found, strict=True) if oid is not None}
        lost = await self._unreadable(known) if known else []
        return [h for h in hashes if h not in known or h in lost]

    async def _unreadable(self, known: dict[str, bytes]) -> list[str]:
        """The parameters the registry names but no live node holds (lost with a node that is gone, e.g. after
        the cluster was brought up again): forgotten, so that they are uploaded again.

        Decided at once, without waiting for a copy: this node's store says what it holds; for the others, the
        control store's object locations are checked against the nodes that are alive."""
        client = await self._client()
        malformed = [h for h, oid in known.items() if len(oid) != OBJECT_ID_LEN]  # not written by a replica
        valid = {h: oid for h, oid in known.items() if h not in malformed}
        here = await asyncio.to_thread(client.contains, list(valid.values())) if valid else []
        elsewhere = {h: oid for (h, oid), present in zip(valid.items(), here, strict=True) if not present}
        lost: list[str] = []
        if elsewhere:
            held = await self.held_by_live_nodes(list(elsewhere.values()), exclude=bytes(client.node_id))
            lost = [h for h, oid in elsewhere.items() if oid not in held]
        return await self._forget(malformed + lost)

    async def held_by_live_nodes(self, object_ids: list[bytes], *, exclude: bytes = b"") -> set[bytes]:
        """Those of ``object_ids`` that a live node other than ``exclude`` holds, as the control store records
        copies (each node's store adds and removes its own) and node liveness (heartbeats)."""
        try:
            objs, nodes = await asyncio.gather(
                self.stub.GetObjects(cpb.GetObjectsRequest(object_ids=object_ids), timeout=self.timeout),
                self.stub.ListNodes(cpb.ListNodesRequest(state=cpb.NODE_STATE_ALIVE), timeout=self.timeout))
        except grpc.aio.AioRpcError as e:
            raise UnavailableError(f"control store: {e.code().name} {e.details()}") from e
        alive = {n.node_id for n in nodes.nodes if n.state == cpb.NODE_STATE_ALIVE} - {exclude}
        return {o.object_id for o in objs.objects if any(n in alive for n in o.locations)}

    async def _forget(self, hashes: list[str]) -> list[str]:
        if hashes:
            await asyncio.gather(*(self.stub.KvDelete(cpb.KvDeleteRequest(namespace=PARAMS, key=h.encode()),
                                                      timeout=self.timeout) for h in hashes))
            log.warning("%d parameter arrays named in the registry are held by no live node: forgotten, to be "
                        "uploaded again", len(hashes))
        return hashes

    async def capacity(self) -> int:
        """Bytes the node's object store can hold in memory (0: unknown)."""
        if self._capacity is None:
            client = await self._client()
            self._capacity = int((await asyncio.to_thread(client.stats)).capacity)
        return self._capacity

    async def check_fits(self, nbytes: int, what: str) -> None:
        """Refuse parameters that the node's object store could never hold at once."""
        cap = await self.capacity()
        if cap and nbytes > cap:
            raise InvalidArgumentError(f"{what}: {nbytes:,} bytes of parameters do not fit in the node's object "
                                       f"store ({cap:,} bytes)")

    async def param_sizes(self, hashes: list[str]) -> int:
        """Bytes of the stored parameters ``hashes`` (as the control store records the objects)."""
        oids = [o for o in await asyncio.gather(*(self.object_id(h) for h in hashes)) if o is not None]
        if not oids:
            return 0
        objs = await self.stub.GetObjects(cpb.GetObjectsRequest(object_ids=oids), timeout=self.timeout)
        return sum(int(o.size) for o in objs.objects)

    async def store_params(self, arrays: dict[str, np.ndarray]) -> int:
        """Put the arrays the cluster lacks into the object store; returns how many were new."""
        new = await self.missing(list(arrays))
        if not new:
            return 0
        await self.check_fits(sum(arrays[h].nbytes for h in new), f"{len(new)} parameter arrays")
        client = await self._client()

        def put_all() -> list[bytes]:
            refs = [client.put(np.ascontiguousarray(arrays[h]), owner="serving") for h in new]
            client.flush()  # small ones are batched: in the store before anyone is told of them
            return [r.id for r in refs]

        try:
            oids = await asyncio.to_thread(put_all)
        except ObjectStoreFullError as e:
            raise ResourceExhaustedError(f"the node's object store is full: {e}") from None
        for h, oid in zip(new, oids, strict=True):
            try:
                await self.stub.KvPut(cpb.KvPutRequest(namespace=PARAMS, key=h.encode(), value=oid, overwrite=False),
                                      timeout=self.timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.ALREADY_EXISTS:  # another replica stored it first: same content
                    raise
        return len(new)

    async def load_params(self, hashes: list[str]) -> dict[str, np.ndarray]:
        """The arrays of ``hashes``: read-only views of the node's shared memory."""
        oids = await asyncio.gather(*(self.object_id(h) for h in hashes))
        lost = [h for h, o in zip(hashes, oids, strict=True) if o is None]
        if lost:
            raise NotFoundError(f"parameters missing from the cluster: {', '.join(lost[:5])}")
        client = await self._client()
        from tessera.client.objects import ObjectRef

        refs = [ObjectRef(o) for o in oids if o is not None]
        try:
            values = await asyncio.to_thread(client.get, refs, timeout=30.0)
        except TimeoutError as e:  # the objects are gone (a node that never came back): forget them, so the
            # next registration finds them missing and uploads them again instead of waiting for them forever
            await asyncio.gather(*(self.stub.KvDelete(cpb.KvDeleteRequest(namespace=PARAMS, key=h.encode()),
                                                      timeout=self.timeout) for h in hashes))
            log.warning("parameters %s... could not be read (%s): forgotten", ", ".join(hashes[:3]), e)
            raise FailedPreconditionError(f"parameters could not be read from the object store ({e}); they are "
                                          "forgotten: register the pipeline again to upload them") from None
        return dict(zip(hashes, values, strict=True))

    async def close(self) -> None:
        if self._objects is not None:
            await asyncio.to_thread(self._objects.close)
