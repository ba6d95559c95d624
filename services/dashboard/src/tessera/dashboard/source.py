"""The dashboard's reader of the cluster: the state API (``tessera._state``) and the control store's client,
with every failure to reach the control store turned into :class:`~tessera.dashboard.model.StoreUnavailable`.

Blocking (gRPC's synchronous stubs, as the state API uses): the app calls it from worker threads.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import grpc

from tessera._state import MAX_LIMIT, list_state
from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.gpu_scheduler.v1 import gpu_scheduler_pb2 as gpb
from tessera.api.serving.v1 import serving_pb2 as spb
from tessera.api.serving.v1 import serving_pb2_grpc as spb_grpc
from tessera.client import Client
from tessera.client._discovery import ClusterNotFoundError
from tessera.common.rpc import health_status, stream_channel
from tessera.dashboard.model import StoreUnavailable, trace_id

#: The control store's key-value namespace where the GPU scheduler keeps one JobInfo per job.
GPU_JOBS_NAMESPACE = "gpu-jobs"


class ControlStoreSource:
    """Reads the control store at ``address``; each call waits at most ``timeout`` seconds."""

    def __init__(self, address: str, *, timeout: float = 3.0) -> None:
        self.address = address
        self.timeout = timeout

    def _unavailable(self, e: Exception) -> StoreUnavailable:
        if isinstance(e, grpc.RpcError):
            code = e.code().name if hasattr(e, "code") else "UNKNOWN"
            why = e.details() if hasattr(e, "details") else str(e)
            return StoreUnavailable(f"the control store at {self.address} does not answer ({code}: {why})")
        return StoreUnavailable(f"the control store at {self.address} does not answer ({e})")

    def rows(self, resource: str) -> list[dict[str, Any]]:
        try:
            return list_state(resource, address=self.address, limit=MAX_LIMIT, timeout=self.timeout)[0]
        except (grpc.RpcError, ClusterNotFoundError, ConnectionError) as e:
            raise self._unavailable(e) from None

    def instances(self) -> list[dict[str, Any]]:
        try:
            with Client(self.address, timeout=self.timeout) as c:
                found = c.instances()
        except (grpc.RpcError, ConnectionError) as e:
            raise self._unavailable(e) from None
        return [{"service": i.service, "instance_id": i.instance_id, "address": i.address, "pid": i.pid,
                 "hostname": i.hostname, "http_address": i.http_address, "metrics_address": i.metrics_address,
                 "started_ms": i.started_ms, "last_seen_ms": i.last_seen_ms} for i in found]

    def health(self, address: str) -> str:
        return health_status(address, timeout=1.0)

    def gpu_jobs(self) -> list[dict[str, Any]]:
        try:
            with Client(self.address, timeout=self.timeout) as c:
                stub: Any = c.stub
                keys = stub.KvList(cpb.KvListRequest(namespace=GPU_JOBS_NAMESPACE), timeout=self.timeout).keys
                raws = []
                for k in keys:
                    try:
                        raws.append(stub.KvGet(cpb.KvGetRequest(namespace=GPU_JOBS_NAMESPACE, key=k),
                                               timeout=self.timeout).value)
                    except grpc.RpcError as e:
                        if e.code() != grpc.StatusCode.NOT_FOUND:  # removed meanwhile: skip it
                            raise
        except (grpc.RpcError, ConnectionError) as e:
            raise self._unavailable(e) from None
        return [_gpu_row(gpb.JobInfo.FromString(r)) for r in raws]

    def serving_stats(self, address: str) -> dict[str, Any] | None:
        """A serving replica's figures (GetStats), or None when it does not answer (left out)."""
        try:
            with stream_channel(address) as ch:
                s = spb_grpc.ServingServiceStub(ch).GetStats(spb.GetStatsRequest(), timeout=2.0)
        except grpc.RpcError:
            return None
        return {"pipelines": s.pipelines, "param_arrays": s.param_arrays, "param_bytes": s.param_bytes,
                "table_bytes": s.table_bytes, "plan_bytes": s.plan_bytes, "batches": s.batches,
                "rows_computed": s.rows_computed, "rows_reused": s.rows_reused}

    def scrape(self, metrics_address: str) -> str:
        """A replica's Prometheus exposition, or "" when it does not answer (its figures are left out)."""
        try:
            with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=2.0) as resp:
                return str(resp.read().decode("utf-8", "replace"))
        except (OSError, urllib.error.URLError, ValueError):
            return ""


def _gpu_row(j: Any) -> dict[str, Any]:
    return {"job_id": j.job_id, "name": j.spec.name, "gpus": j.spec.gpus,
            "state": gpb.JobState.Name(j.state).removeprefix("JOB_STATE_") if j.state in gpb.JobState.values()
            else str(j.state), "node_id": j.node_id, "gpu_slots": list(j.gpu_slots), "step": j.step,
            "submitted_at": j.submitted_at, "started_at": j.started_at, "finished_at": j.finished_at,
            "last_ran_at": j.last_ran_at, "minibatch_s": j.minibatch_s, "suspensions": j.suspensions,
            "migrations": j.migrations, "requeues": j.requeues, "packed_with": j.packed_with, "held": j.held,
            "message": j.message, "attained_gpu_s": j.attained_gpu_s,
            "trace_id": trace_id(dict(j.spec.env).get("TRACEPARENT", "")),
            "history": [{"node_id": h.node_id, "gpu_slots": list(h.gpu_slots), "start": h.start, "end": h.end,
                         "packed_with": h.packed_with, "ended_by": h.ended_by} for h in j.history]}
