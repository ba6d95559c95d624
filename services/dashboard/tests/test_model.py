"""The page models: pure figures (quantiles from Prometheus histograms, counts, throughput) and the pages built
from what a real control store holds (written through its gRPC API, read back by the state API)."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from tessera.api.control_store.v1 import control_store_pb2 as pb
from tessera.api.gpu_scheduler.v1 import gpu_scheduler_pb2 as gpb
from tessera.api.serving.v1 import serving_pb2 as spb
from tessera.common import ids
from tessera.common.registry import control_store_stub
from tessera.dashboard import model, render
from tessera.dashboard.source import GPU_JOBS_NAMESPACE, ControlStoreSource

EXPOSITION = """# HELP tessera_serving_request_duration_seconds Prediction requests by pipeline
# TYPE tessera_serving_request_duration_seconds histogram
tessera_serving_request_duration_seconds_bucket{le="0.001",tessera_pipeline="a"} 50
tessera_serving_request_duration_seconds_bucket{le="0.01",tessera_pipeline="a"} 90
tessera_serving_request_duration_seconds_bucket{le="0.1",tessera_pipeline="a"} 100
tessera_serving_request_duration_seconds_bucket{le="+Inf",tessera_pipeline="a"} 100
tessera_serving_request_duration_seconds_bucket{error_type="x",le="0.001",tessera_pipeline="a"} 0
tessera_serving_request_duration_seconds_bucket{error_type="x",le="+Inf",tessera_pipeline="a"} 10
tessera_serving_request_duration_seconds_count{tessera_pipeline="a"} 100
tessera_serving_request_duration_seconds_bucket{le="0.001",tessera_pipeline="b"} 0
tessera_serving_request_duration_seconds_bucket{le="+Inf",tessera_pipeline="b"} 4
other_metric_bucket{le="1",tessera_pipeline="a"} 7
"""


def test_histogram_buckets_and_quantiles() -> None:
    got = model.histogram_buckets(EXPOSITION, model.LATENCY_METRIC, "tessera_pipeline")
    assert set(got) == {"a", "b"}
    # the series with an error label is added to the others of its pipeline
    assert got["a"] == {0.001: 50, 0.01: 90, 0.1: 100, math.inf: 110}
    assert model.quantile(got["a"], 0.5) == pytest.approx(0.001 + 0.009 * (55 - 50) / 40)  # rank 55 of 110
    assert model.quantile(got["a"], 0.99) == 0.1  # rank 108.9 lies beyond the last finite bound
    assert model.quantile(got["b"], 0.5) == 0.001
    assert model.quantile({}, 0.5) is None and model.quantile({math.inf: 0.0}, 0.5) is None
    assert model.quantile({0.01: 10.0, math.inf: 10.0}, 0.5) == pytest.approx(0.005)


def test_trace_ids_and_links() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert model.trace_id(tp) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert model.trace_id("") == model.trace_id("garbage") == model.trace_id("00-" + "0" * 32 + "-00f067aa0ba902b7-01") == ""
    assert model.trace_url("http://j:16686/", "ab") == "http://j:16686/trace/ab"
    assert model.trace_url("", "ab") == model.trace_url("http://j", "") == ""


def test_counts_and_throughput() -> None:
    rows = [{"name": "f", "state": "FINISHED", "updated_ms": 10_500}, {"name": "f", "state": "FAILED", "updated_ms": 12_100},
            {"name": "g", "state": "RUNNING", "updated_ms": 11_000}, {"name": "", "state": "FINISHED", "updated_ms": 0}]
    assert model.count_by(rows, "name") == [
        {"name": "f", "total": 2, "states": {"FINISHED": 1, "FAILED": 1}},
        {"name": "(unnamed)", "total": 1, "states": {"FINISHED": 1}},
        {"name": "g", "total": 1, "states": {"RUNNING": 1}}]
    assert model.throughput(rows) == {"t": [10.0, 11.0, 12.0], "finished": [1.0, 0.0, 0.0], "failed": [0.0, 0.0, 1.0]}
    assert model.throughput([]) == {"t": [], "finished": [], "failed": []}


# ------------------------------------------------------------------------------- from a real control store


def _fill(address: str) -> dict[str, Any]:
    """A node, a job, a function with a finished and a failed task, an actor, a GPU job and a pipeline."""
    ch, cs = control_store_stub(address)
    now = int(time.time() * 1000)
    node, job, fn = ids.new_id("node_id"), ids.new_id("job_id"), ids.new_id("function_id")
    with ch:
        cs.RegisterNode(pb.RegisterNodeRequest(node=pb.NodeInfo(
            node_id=node, address="127.0.0.1:1", resources_total={"CPU": 4.0, "GPU": 1.0},
            resources_available={"CPU": 3.0, "GPU": 1.0}, state=pb.NODE_STATE_ALIVE)), timeout=10)
        cs.CreateJob(pb.CreateJobRequest(job=pb.JobInfo(job_id=job, state=pb.JOB_STATE_RUNNING, start_ms=now)), timeout=10)
        fid = cs.ExportFunction(pb.ExportFunctionRequest(job_id=job, name="mod.Counter", code=b"class"),
                                timeout=10).function_id
        ok, bad = ids.new_id("task_id"), ids.new_id("task_id")
        specs = [pb.TaskSpec(task_id=t, job_id=job, function_id=fn, function_name="mod.work", num_returns=1)
                 for t in (ok, bad)]
        cs.CreateTasks(pb.CreateTasksRequest(specs=specs), timeout=10)
        cs.UpdateTaskStates(pb.UpdateTaskStatesRequest(updates=[
            pb.TaskStateUpdate(task_id=ok, state=pb.TASK_STATE_FINISHED, node_id=node),
            pb.TaskStateUpdate(task_id=bad, state=pb.TASK_STATE_FAILED, node_id=node,
                               error="Traceback (most recent call last):\nValueError: <boom & bust>")]), timeout=10)
        actor = ids.new_id("actor_id")
        cs.CreateActor(pb.CreateActorRequest(actor=pb.ActorInfo(
            actor_id=actor, job_id=job, name="counter", class_function_id=fid, state=pb.ACTOR_STATE_ALIVE,
            node_id=node, created_ms=now)), timeout=10)
        gjob = gpb.JobInfo(job_id="g1", spec=gpb.JobSpec(name="train", gpus=1, env={
            "TRACEPARENT": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}),
            state=gpb.JOB_STATE_SUCCEEDED, node_id=node.hex(), gpu_slots=[0], submitted_at=100.0, started_at=101.0,
            finished_at=131.0, suspensions=2, migrations=1)
        cs.KvPut(pb.KvPutRequest(namespace=GPU_JOBS_NAMESPACE, key=b"g1", value=gjob.SerializeToString(),
                                 overwrite=True), timeout=10)
        pipe = spb.PipelineSpec(name="ridge", latency_budget_ms=2.0, graph_json='{"nodes": [{}, {}]}', registered_ms=now)
        cs.KvPut(pb.KvPutRequest(namespace="serving-pipelines", key=b"ridge", value=pipe.SerializeToString(),
                                 overwrite=True), timeout=10)
    return {"node": node.hex(), "ok": ok.hex(), "bad": bad.hex(), "actor": actor.hex()}


def test_pages_from_the_control_store(store: Any) -> None:
    made = _fill(store.address)
    src = ControlStoreSource(store.address)

    cluster = model.page_model("cluster", src)
    assert cluster["store_down"] == "" and made["node"] in {n["node_id"] for n in cluster["nodes"]}
    cpu = next(r for r in cluster["resources"] if r["name"] == "CPU")
    assert cpu["total"] >= 4.0 and cpu["total"] - cpu["available"] >= 1.0
    cs = next(s for s in cluster["services"] if s["name"] == "control-store")
    assert cs["replicas"] == 1 and cs["serving"] == 1 and cs["instances"][0]["address"] == store.address

    tasks = model.page_model("tasks", src, "http://jaeger:16686")
    work = next(f for f in tasks["by_function"] if f["name"] == "mod.work")
    assert work["states"] == {"FINISHED": 1, "FAILED": 1}
    assert [t["task_id"] for t in tasks["failures"]] == [made["bad"]]
    assert "ValueError: <boom & bust>" in tasks["failures"][0]["error"]
    assert made["actor"] in {a["actor_id"] for a in tasks["actors"]}
    assert any(c["name"] == "mod.Counter" for c in tasks["by_class"])
    html = render.main(tasks)
    assert "&lt;boom &amp; bust&gt;" in html and "<boom" not in html  # escaped

    gpu = model.page_model("gpu", src, "http://jaeger:16686")
    (job,) = gpu["jobs"]
    assert job["state"] == "SUCCEEDED" and job["jct_s"] == 31.0 and gpu["mean_jct_s"] == 31.0
    assert gpu["suspensions"] == 2 and gpu["migrations"] == 1 and gpu["chart"] == {"t": [131.0], "jct": [31.0]}
    assert job["trace_url"] == "http://jaeger:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736"
    assert 'data-job-id="g1"' in render.main(gpu)

    serving = model.page_model("serving", src)
    (ridge,) = serving["pipelines"]
    assert ridge["name"] == "ridge" and ridge["operators"] == 2 and ridge["requests"] == 0 and ridge["p50_ms"] is None

    with pytest.raises(KeyError):
        model.page_model("nope", src)


def test_store_down_then_back(store: Any) -> None:
    src = ControlStoreSource(store.address, timeout=2.0)
    store.stop()
    try:
        for page in model.PAGES:
            m = model.page_model(page, src)
            assert m["store_down"].startswith(f"the control store at {store.address} does not answer (")
            html = render.page(m)
            assert 'id="store-down"' in html and "Traceback" not in html
    finally:
        store.start()
    assert model.page_model("cluster", src)["store_down"] == ""
