"""gRPC ↔ domain: ControlStoreService over :class:`~tessera.control_store.store.ControlStore`.

Each method unpacks its request, calls the domain and packs the reply. Domain
errors become status codes in :mod:`tessera.common.rpc`; nothing here decides
what is valid.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc.aio
from google.protobuf.message import DecodeError

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.api.control_store.v1 import control_store_pb2_grpc as pb_grpc
from tessera.common.errors import InvalidArgumentError, ResourceExhaustedError
from tessera.control_store import events
from tessera.control_store.store import ControlStore, check_name
from tessera.control_store.wire import fields

log = logging.getLogger(__name__)

#: subscribe(subject, on_message) -> unsubscribe; wired to NATS by server.py.
Subscribe = Callable[[str, Callable[[bytes], Awaitable[None]]], Awaitable[Callable[[], Awaitable[None]]]]

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]

#: Events a slow Watch client may fall behind by before it is cut off.
WATCH_QUEUE = 10_000

_TASKS = b"\x0a"  # GetTasksResponse.tasks and UpdateTaskStatesResponse.tasks: field 1, length-delimited


class ControlStoreServicer(pb_grpc.ControlStoreServiceServicer):
    def __init__(self, store: ControlStore, subscribe: Subscribe, *, instance_ttl_s: int) -> None:
        self.store = store
        self.subscribe = subscribe
        self.instance_ttl_s = instance_ttl_s

    # nodes
    async def RegisterNode(self, request: pb.RegisterNodeRequest, context: Ctx) -> pb.RegisterNodeResponse:
        return pb.RegisterNodeResponse(node=await self.store.register_node(request.node))

    async def NodeHeartbeat(self, request: pb.NodeHeartbeatRequest, context: Ctx) -> pb.NodeHeartbeatResponse:
        state = await self.store.node_heartbeat(request.node_id, dict(request.resources_available))
        return pb.NodeHeartbeatResponse(state=state)  # type: ignore[arg-type]

    async def GetNode(self, request: pb.GetNodeRequest, context: Ctx) -> pb.GetNodeResponse:
        return pb.GetNodeResponse(node=await self.store.get_node(request.node_id))

    async def ListNodes(self, request: pb.ListNodesRequest, context: Ctx) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(nodes=await self.store.list_nodes(request.state))

    # jobs
    async def CreateJob(self, request: pb.CreateJobRequest, context: Ctx) -> pb.CreateJobResponse:
        return pb.CreateJobResponse(job=await self.store.create_job(request.job))

    async def GetJob(self, request: pb.GetJobRequest, context: Ctx) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=await self.store.get_job(request.job_id))

    async def ListJobs(self, request: pb.ListJobsRequest, context: Ctx) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=await self.store.list_jobs())

    async def UpdateJobState(self, request: pb.UpdateJobStateRequest, context: Ctx) -> pb.UpdateJobStateResponse:
        job = await self.store.update_job_state(request.job_id, request.state, request.message)
        return pb.UpdateJobStateResponse(job=job)

    # functions
    async def ExportFunction(self, request: pb.ExportFunctionRequest, context: Ctx) -> pb.ExportFunctionResponse:
        fid, created = await self.store.export_function(request.job_id, request.name, request.code,
                                                        request.expected_function_id)
        return pb.ExportFunctionResponse(function_id=fid, created=created)

    async def GetFunction(self, request: pb.GetFunctionRequest, context: Ctx) -> pb.GetFunctionResponse:
        return pb.GetFunctionResponse(function=await self.store.get_function(request.function_id))

    # tasks
    async def CreateTasks(self, request: pb.CreateTasksRequest, context: Ctx) -> pb.CreateTasksResponse:
        return pb.CreateTasksResponse(created=await self.store.create_tasks(
            request.specs, state=request.state, replace=request.replace, node_id=request.node_id))

    # The replies of the two batched task calls are assembled from the stored bytes
    # (field 1, repeated TaskRecord, once per record) and parsed once, rather than
    # parsing and copying every record on its own.
    async def GetTasks(self, request: pb.GetTasksRequest, context: Ctx) -> pb.GetTasksResponse:
        raws = await self.store.get_tasks_raw(request.task_ids)
        return pb.GetTasksResponse.FromString(b"".join(fields(_TASKS, raws)))

    async def ListTasks(self, request: pb.ListTasksRequest, context: Ctx) -> pb.ListTasksResponse:
        tasks, truncated = await self.store.list_tasks(job_id=request.job_id, state=request.state,
                                                       limit=request.limit)
        return pb.ListTasksResponse(tasks=tasks, truncated=truncated)

    async def UpdateTaskStates(self, request: pb.UpdateTaskStatesRequest, context: Ctx) -> pb.UpdateTaskStatesResponse:
        got = await self.store.update_task_states_raw(request.updates)
        return pb.UpdateTaskStatesResponse.FromString(b"".join(fields(_TASKS, [raw for _, raw in got])))

    async def GetLineage(self, request: pb.GetLineageRequest, context: Ctx) -> pb.GetLineageResponse:
        return pb.GetLineageResponse(tasks=await self.store.get_lineage(request.object_id, request.max_depth))

    # objects
    async def AddObjectLocations(self, request: pb.AddObjectLocationsRequest, context: Ctx) -> pb.AddObjectLocationsResponse:
        await self.store.add_object_locations(request.locations)
        return pb.AddObjectLocationsResponse()

    async def RemoveObjectLocations(self, request: pb.RemoveObjectLocationsRequest,
                                    context: Ctx) -> pb.RemoveObjectLocationsResponse:
        lost = await self.store.remove_object_locations(request.locations)
        return pb.RemoveObjectLocationsResponse(lost_object_ids=lost)

    async def GetObjects(self, request: pb.GetObjectsRequest, context: Ctx) -> pb.GetObjectsResponse:
        return pb.GetObjectsResponse(objects=await self.store.get_objects(request.object_ids))

    async def DeleteObjects(self, request: pb.DeleteObjectsRequest, context: Ctx) -> pb.DeleteObjectsResponse:
        return pb.DeleteObjectsResponse(deleted=await self.store.delete_objects(request.object_ids))

    async def FreeObjects(self, request: pb.FreeObjectsRequest, context: Ctx) -> pb.FreeObjectsResponse:
        return pb.FreeObjectsResponse(freed=await self.store.free_objects(request.object_ids, request.task_ids,
                                                                          request.reason, remember=request.remember))

    # actors
    async def CreateActor(self, request: pb.CreateActorRequest, context: Ctx) -> pb.CreateActorResponse:
        return pb.CreateActorResponse(actor=await self.store.create_actor(request.actor))

    async def GetActor(self, request: pb.GetActorRequest, context: Ctx) -> pb.GetActorResponse:
        actor = await self.store.get_actor(request.actor_id, request.name, request.namespace)
        return pb.GetActorResponse(actor=actor)

    async def ListActors(self, request: pb.ListActorsRequest, context: Ctx) -> pb.ListActorsResponse:
        return pb.ListActorsResponse(actors=await self.store.list_actors(request.state))

    async def UpdateActor(self, request: pb.UpdateActorRequest, context: Ctx) -> pb.UpdateActorResponse:
        actor = await self.store.update_actor(request.actor_id, request.state, node_id=request.node_id,
                                              address=request.address, death_cause=request.death_cause,
                                              creation_spec=request.creation_spec, if_node_id=request.if_node_id,
                                              clear_node=request.clear_node)
        return pb.UpdateActorResponse(actor=actor)

    # kv
    async def KvPut(self, request: pb.KvPutRequest, context: Ctx) -> pb.KvPutResponse:
        created = await self.store.kv_put(request.namespace, request.key, request.value, overwrite=request.overwrite)
        return pb.KvPutResponse(created=created)

    async def KvGet(self, request: pb.KvGetRequest, context: Ctx) -> pb.KvGetResponse:
        return pb.KvGetResponse(value=await self.store.kv_get(request.namespace, request.key))

    async def KvDelete(self, request: pb.KvDeleteRequest, context: Ctx) -> pb.KvDeleteResponse:
        return pb.KvDeleteResponse(deleted=await self.store.kv_delete(request.namespace, request.key))

    async def KvList(self, request: pb.KvListRequest, context: Ctx) -> pb.KvListResponse:
        return pb.KvListResponse(keys=await self.store.kv_list(request.namespace, request.prefix))

    # instances
    async def RegisterInstance(self, request: pb.RegisterInstanceRequest, context: Ctx) -> pb.RegisterInstanceResponse:
        await self.store.register_instance(request.instance, request.ttl_s or self.instance_ttl_s)
        return pb.RegisterInstanceResponse()

    async def DeregisterInstance(self, request: pb.DeregisterInstanceRequest,
                                 context: Ctx) -> pb.DeregisterInstanceResponse:
        await self.store.deregister_instance(request.service, request.instance_id)
        return pb.DeregisterInstanceResponse()

    async def ListInstances(self, request: pb.ListInstancesRequest, context: Ctx) -> pb.ListInstancesResponse:
        return pb.ListInstancesResponse(instances=await self.store.list_instances(request.service))

    # change feed
    async def Watch(self, request: pb.WatchRequest, context: Ctx) -> AsyncIterator[pb.WatchResponse]:
        if request.table not in events.TABLES:
            raise InvalidArgumentError(f"table must be one of {', '.join(events.TABLES)}, got {request.table!r}")
        if request.namespace:
            if request.table != "kv":
                raise InvalidArgumentError("namespace applies to the kv table only")
            check_name(request.namespace, "namespace")
        queue: asyncio.Queue[pb.ChangeEvent | None] = asyncio.Queue()

        async def on_message(data: bytes) -> None:
            try:  # anyone on NATS can publish on these subjects: what is not an event is not relayed
                event = pb.ChangeEvent.FromString(data)
            except DecodeError:
                log.warning("dropped %d bytes on the %s watch that are not a ChangeEvent", len(data), request.table)
                return
            if queue.qsize() < WATCH_QUEUE:
                queue.put_nowait(event)
            elif queue.qsize() == WATCH_QUEUE:  # too slow a client: end its stream rather than grow without bound
                queue.put_nowait(None)

        unsubscribe = await self.subscribe(events.watch_subject(request.table, request.namespace), on_message)
        try:
            await context.send_initial_metadata(())  # tells the client the subscription is in place
            while True:
                event = await queue.get()
                if event is None:
                    raise ResourceExhaustedError("watch fell too far behind; re-read and watch again")
                yield pb.WatchResponse(event=event)
        finally:
            await unsubscribe()
