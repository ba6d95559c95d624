"""gRPC <-> the live scheduler (:mod:`scheduler`)."""

from __future__ import annotations

import asyncio
from typing import Any

from tessera.api.gpu_scheduler.v1 import gpu_scheduler_pb2 as pb
from tessera.api.gpu_scheduler.v1 import gpu_scheduler_pb2_grpc as pb_grpc
from tessera.common.errors import InvalidArgumentError
from tessera.common.telemetry import traceparent_env
from tessera.gpu_scheduler.scheduler import GpuScheduler


def _job_id(v: str) -> str:
    if not v:
        raise InvalidArgumentError("job_id is required")
    return v


class GpuSchedulerServicer(pb_grpc.GpuSchedulerServiceServicer):
    def __init__(self, sched: GpuScheduler, lock: asyncio.Lock, policy: str) -> None:
        self.sched = sched
        self.lock = lock
        self.policy = policy

    async def _ready(self) -> None:
        if not self.sched.loaded:
            await self.sched.load()

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Any) -> pb.SubmitJobResponse:  # noqa: N802
        # the job's record keeps the trace of its submission: its starts, time slices and process continue it
        request.spec.env.update(traceparent_env())
        async with self.lock:
            await self._ready()
            return pb.SubmitJobResponse(job_id=(await self.sched.submit(request.spec)).job_id)

    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.GetJobResponse:  # noqa: N802
        await self._ready()
        return pb.GetJobResponse(job=self.sched.get(_job_id(request.job_id)))

    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:  # noqa: N802
        await self._ready()
        return pb.ListJobsResponse(jobs=self.sched.list_jobs(request.group_id))

    async def KillJob(self, request: pb.KillJobRequest, context: Any) -> pb.KillJobResponse:  # noqa: N802
        async with self.lock:
            await self._ready()
            return pb.KillJobResponse(job=await self.sched.kill(_job_id(request.job_id)))

    async def SuspendJob(self, request: pb.SuspendJobRequest, context: Any) -> pb.SuspendJobResponse:  # noqa: N802
        async with self.lock:
            await self._ready()
            return pb.SuspendJobResponse(job=await self.sched.suspend(_job_id(request.job_id)))

    async def ResumeJob(self, request: pb.ResumeJobRequest, context: Any) -> pb.ResumeJobResponse:  # noqa: N802
        async with self.lock:
            await self._ready()
            return pb.ResumeJobResponse(job=await self.sched.resume(_job_id(request.job_id)))

    async def MigrateJob(self, request: pb.MigrateJobRequest, context: Any) -> pb.MigrateJobResponse:  # noqa: N802
        async with self.lock:
            await self._ready()
            return pb.MigrateJobResponse(job=await self.sched.migrate(_job_id(request.job_id), request.node_id))

    async def GetCluster(self, request: pb.GetClusterRequest, context: Any) -> pb.GetClusterResponse:  # noqa: N802
        nodes = [pb.GpuNode(node_id=n["node_id"], gpus=n["gpus"], kind=n["kind"], gpu_names=n["names"], alive=n["alive"],
                            job_ids=n["job_ids"]) for n in self.sched.cluster()]
        return pb.GetClusterResponse(nodes=nodes, policy=self.policy)
