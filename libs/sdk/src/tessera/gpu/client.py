"""The blocking client of the gpu-scheduler service."""

from __future__ import annotations

from typing import Any

from tessera.api.gpu_scheduler.v1 import gpu_scheduler_pb2 as pb
from tessera.api.gpu_scheduler.v1 import gpu_scheduler_pb2_grpc as pb_grpc
from tessera.common.rpc import channel

SERVICE = "tessera.gpu_scheduler.v1.GpuSchedulerService"
IDEMPOTENT = ("GetJob", "ListJobs", "GetCluster")


def job_to_dict(j: pb.JobInfo) -> dict[str, Any]:
    return {"job_id": j.job_id, "name": j.spec.name, "state": pb.JobState.Name(j.state).removeprefix("JOB_STATE_"),
            "gpus": j.spec.gpus, "node_id": j.node_id, "gpu_slots": list(j.gpu_slots), "step": j.step,
            "checkpoint_step": j.checkpoint_step, "checkpoint_object_id": j.checkpoint_object_id.hex(),
            "minibatch_s": j.minibatch_s, "metrics": dict(j.metrics),
            "suspensions": j.suspensions, "migrations": j.migrations, "requeues": j.requeues, "held": j.held,
            "packed_with": j.packed_with, "message": j.message, "exit_code": j.exit_code}


class GpuClient:
    """Submit, watch and steer GPU jobs.

    Args:
        address: host:port of a gpu-scheduler; default: the one registered in the cluster's control store.
        timeout: deadline, in seconds, of every call.
    """

    def __init__(self, address: str | None = None, *, timeout: float = 10.0, cluster_address: str | None = None) -> None:
        """``cluster_address``: the control store (default: the cluster found the usual way)."""
        self.timeout = timeout
        self._cluster_address = cluster_address
        self._uploaded: set[str] = set()  # working_dir packages this client stored
        if not address:
            from tessera.client import Client

            with Client(cluster_address, timeout=timeout) as c:
                found = [i.address for i in c.instances("gpu-scheduler")]
            if not found:
                raise ConnectionError("no gpu-scheduler is registered in the cluster")
            address = found[0]
        self.address = address
        self._channel = channel(address, service=SERVICE, idempotent_methods=IDEMPOTENT, default_timeout=timeout)
        self._stub = pb_grpc.GpuSchedulerServiceStub(self._channel)

    def __enter__(self) -> GpuClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def submit(self, *, entry_point: str = "", image: str = "", args: list[str] | None = None, gpus: int = 1,
               priority: int = 0, group: str = "", time_limit_s: float = 0.0, name: str = "",
               env: dict[str, str] | None = None, elastic: bool = False, working_dir: str | None = None) -> str:
        """Submit a job; returns its id. INVALID_ARGUMENT for a bad spec (no entry point, 0 or too many GPUs).

        An entry point ``path/to/file.py:function`` that exists here travels with the job: the source files of
        its folder (or of ``working_dir``, which must contain it) are packed and stored in the control store,
        and the node running the job unpacks them (as Ray's ``working_dir``). So the job runs on nodes that
        cannot see this machine's files (a compose stack, another host).
        """
        spec = pb.JobSpec(name=name, entry_point=entry_point, image=image, args=args or [], gpus=gpus,
                          priority=priority, group_id=group, time_limit_s=time_limit_s, env=env or {}, elastic=elastic)
        self._pack(spec, working_dir)
        return str(self._stub.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=self.timeout).job_id)

    def _pack(self, spec: pb.JobSpec, working_dir: str | None) -> None:
        from pathlib import Path

        from tessera.common import packages

        mod, sep, fn = spec.entry_point.rpartition(":")
        if not sep or not mod.endswith(".py") or not Path(mod).is_file():
            if working_dir:
                raise ValueError(f"working_dir needs an entry point path/to/file.py:function that exists here, "
                                 f"got {spec.entry_point!r}")
            return
        entry = Path(mod).resolve()
        folder = Path(working_dir).resolve() if working_dir else entry.parent
        if not entry.is_relative_to(folder):
            raise ValueError(f"the entry point {entry} is not inside working_dir {folder}")
        uri, blob = packages.pack(folder)
        if uri not in self._uploaded:  # a sweep submits the same folder many times: stored once
            from tessera.client import Client

            with Client(self._cluster_address, timeout=max(self.timeout, 30.0)) as c:
                c.kv_put(packages.NAMESPACE, packages.key_of(uri), blob, overwrite=True)
            self._uploaded.add(uri)
        spec.working_dir = uri
        spec.entry_point = f"{entry.relative_to(folder).as_posix()}:{fn}"

    def status(self, job_id: str) -> pb.JobInfo:
        return self._stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=self.timeout).job

    def list(self, group: str = "") -> list[pb.JobInfo]:
        return list(self._stub.ListJobs(pb.ListJobsRequest(group_id=group), timeout=self.timeout).jobs)

    def kill(self, job_id: str) -> pb.JobInfo:
        return self._stub.KillJob(pb.KillJobRequest(job_id=job_id), timeout=self.timeout).job

    def suspend(self, job_id: str) -> pb.JobInfo:
        return self._stub.SuspendJob(pb.SuspendJobRequest(job_id=job_id), timeout=self.timeout).job

    def resume(self, job_id: str) -> pb.JobInfo:
        return self._stub.ResumeJob(pb.ResumeJobRequest(job_id=job_id), timeout=self.timeout).job

    def migrate(self, job_id: str, *, node_id: str = "") -> pb.JobInfo:
        return self._stub.MigrateJob(pb.MigrateJobRequest(job_id=job_id, node_id=node_id), timeout=self.timeout).job

    def checkpoint(self, job_id: str, *, timeout: float = 60.0) -> dict[str, Any]:
        """The state of the job's last checkpoint in the object store: ``step``, ``models`` and ``optimizers``
        (their ``state_dict``), ``extra``, ``metrics``.

        Raises:
            LookupError: the job has no checkpoint in the object store yet.
        """
        from tessera.client.objects import ObjectRef, local_object_store_address, open_object_client
        from tessera.gpu import _ckpt

        j = self.status(job_id)
        if not j.checkpoint_object_id:
            raise LookupError(f"job {job_id} has no checkpoint in the object store yet")
        with open_object_client(local_object_store_address()) as store:
            data = store.get(ObjectRef(j.checkpoint_object_id), timeout=timeout)
            # a copy: a view of shared memory dies with the client
            state: dict[str, Any] = _ckpt.load_bytes(bytearray(memoryview(data).cast("B")))
            del data
        return state

    def cluster(self) -> pb.GetClusterResponse:
        return self._stub.GetCluster(pb.GetClusterRequest(), timeout=self.timeout)
