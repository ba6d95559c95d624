"""The compiler service as processes: a control store, an object store and compiler replicas over
a private nats-server and redis-server. Compile, Run, GetArtifact; bad input; a replica killed
in the middle of a job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from models import MLP, BertLayer

from tessera.api.compiler.v1 import compiler_pb2 as pb
from tessera.api.compiler.v1 import compiler_pb2_grpc as pb_grpc
from tessera.common import procs
from tessera.common.errors import InvalidArgumentError
from tessera.common.rpc import health_status
from tessera.compiler.client import CompilerClient, tensor
from tessera.compiler.frontend import from_torch
from tessera.compiler.serialize import dump_graph
from tessera.testing import nats_server, redis_server, track


@dataclass
class Proc:
    name: str
    address: str
    proc: subprocess.Popen[bytes]
    log: Path
    control_store: str = ""

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    base_env: dict[str, str]
    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, module: str, name: str, **env: str) -> Proc:
        port = procs.free_port()
        log = self.log_dir / f"{name}.log"
        p = procs.start([sys.executable, "-m", module], log_path=log,
                        env={**self.base_env, "TESSERA_GRPC_PORT": str(port), "TESSERA_INSTANCE_ID": name, **env})
        track(p)
        proc = Proc(name, f"127.0.0.1:{port}", p, log, self.base_env["TESSERA_CONTROL_STORE_ADDRESS"])
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while health_status(proc.address, timeout=0.5) != "SERVING":
            if p.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} did not start:\n{proc.text()[-3000:]}")
            time.sleep(0.1)
        return proc

    def compiler(self, name: str, **env: str) -> Proc:
        return self.start("tessera.compiler", name, TESSERA_COMPILER_CACHE_DIR=str(self.log_dir / f"cache-{name}"), **env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("compiler-cluster")
    with nats_server() as nats, redis_server() as redis:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
        cs_port = procs.free_port()
        env.update(TESSERA_NATS_URL=nats.url, TESSERA_REDIS_URLS=redis.url, TESSERA_CONTROL_STORE_ADDRESS=f"127.0.0.1:{cs_port}",
                   TESSERA_RUN_DIR=str(tmp / "run"), TESSERA_HEARTBEAT_INTERVAL_S="0.5", TESSERA_SHUTDOWN_GRACE_S="1",
                   TESSERA_OBJECT_STORE_MEMORY=str(256 * 2**20), TESSERA_OBJECT_STORE_PREFAULT="false",
                   OTEL_TRACES_SAMPLER="always_off", TESSERA_COMPILER_JOB_ACK_WAIT_S="3")
        c = Cluster(env, tmp)
        try:
            port_env = {"TESSERA_GRPC_PORT": str(cs_port)}
            p = procs.start([sys.executable, "-m", "tessera.control_store"], log_path=tmp / "control-store.log",
                            env={**env, **port_env, "TESSERA_INSTANCE_ID": "cs"})
            track(p)
            c.procs.append(Proc("control-store", f"127.0.0.1:{cs_port}", p, tmp / "control-store.log"))
            deadline = time.monotonic() + 60
            while health_status(f"127.0.0.1:{cs_port}", timeout=0.5) != "SERVING":
                assert p.poll() is None and time.monotonic() < deadline, (tmp / "control-store.log").read_text()
                time.sleep(0.1)
            c.start("tessera.object_store", "object-store")
            yield c
        finally:
            for proc in reversed(c.procs):
                if proc.proc.poll() is None:
                    procs.stop(proc.proc, timeout=10)


@pytest.fixture(scope="module")
def replica(cluster: Cluster) -> Proc:
    return cluster.compiler("compiler-a")


def graph_bytes(model: Any, inputs: list[torch.Tensor]) -> bytes:
    return dump_graph(from_torch(model, inputs))


def test_compile_run_get_artifact(replica: Proc) -> None:
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 32)
    with CompilerClient(replica.address, timeout=120) as client:
        info = client.compile(model, [x])
        assert info.state == pb.ARTIFACT_STATE_READY and len(info.artifact_id) == 32
        assert [list(s.shape) for s in info.inputs] == [[4, 32]] and [list(s.shape) for s in info.outputs] == [[4, 10]]
        assert "fused[matmul+add+relu]" in info.fused_graph and len(info.kernels) == 3
        (y,) = client.run(info.artifact_id, [x.numpy()])
        np.testing.assert_allclose(y, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
        again = client.stub.Compile(pb.CompileRequest(model=graph_bytes(model, [x]), format=pb.MODEL_FORMAT_TESSERA_GRAPH,
                                                      wait=True), timeout=60)
        assert again.cached and again.artifact.artifact_id == info.artifact_id  # content-addressed
        local = client.load(info.artifact_id)  # the bundle from the object store, run in this process
        np.testing.assert_allclose(local(x.numpy()), y, rtol=0, atol=0)
        got = client.artifact(info.artifact_id)
        assert got.object_id == info.object_id and got.compiled_by == "compiler-a"


def edit(data: bytes, change: Any) -> bytes:
    """Re-pack a serialized graph after ``change(doc)`` edits its JSON document."""
    import io
    import json

    with np.load(io.BytesIO(data)) as z:
        arrays = {k: z[k] for k in z.files}
    doc = json.loads(bytes(arrays["__graph__"]).decode())
    change(doc)
    arrays["__graph__"] = np.frombuffer(json.dumps(doc).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def exported(model: Any, inputs: list[torch.Tensor]) -> bytes:
    import io

    buf = io.BytesIO()
    torch.export.save(torch.export.export(model.eval(), tuple(inputs)), buf)
    return buf.getvalue()


@pytest.mark.slow
def test_exported_program(replica: Proc) -> None:
    """A torch.export program, traced on the service."""
    torch.manual_seed(2)
    model, x = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.GELU()).eval(), torch.randn(24, 48)
    spec = [pb.TensorSpec(shape=[24, 48], dtype="float32")]
    with CompilerClient(replica.address, timeout=180) as client:
        info = client.compile_bytes(exported(model, [x]), fmt=pb.MODEL_FORMAT_EXPORTED_PROGRAM, inputs=spec)
        assert info.state == pb.ARTIFACT_STATE_READY and "matmul+add+gelu" in info.fused_graph
        (y,) = client.run(info.artifact_id, [x.numpy()])
        np.testing.assert_allclose(y, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_tuning_budget_logs_to_the_control_store(replica: Proc) -> None:
    """A Compile with a tuning budget: the best schedule lands in the control store's tuning log."""
    torch.manual_seed(3)
    model, x = torch.nn.Sequential(torch.nn.Linear(40, 48), torch.nn.ReLU()).eval(), torch.randn(24, 40)
    with CompilerClient(replica.address, timeout=300) as client:
        req = pb.CompileRequest(model=graph_bytes(model, [x]), format=pb.MODEL_FORMAT_TESSERA_GRAPH, tuning_budget_s=3.0, wait=True)
        tuned = client.stub.Compile(req, timeout=300).artifact
        (y,) = client.run(tuned.artifact_id, [x.numpy()])
        np.testing.assert_allclose(y, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    from tessera.client import Client

    with Client(replica_cs_address(replica)) as cs:
        keys = cs.kv_list("compiler_tuning")
        assert keys, "no tuning record in the control store"
        recs = [json.loads(cs.kv_get("compiler_tuning", k)) for k in keys]
        assert any(r["trials"] >= 1 and r["gflops"] > 0 and set(r["knobs"]) == {"mm_rows", "mm_cols", "mm_kunroll"}
                   for r in recs)


def replica_cs_address(replica: Proc) -> str:
    return replica.control_store


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_bad_input_is_invalid_argument(replica: Proc) -> None:
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(2, 32)
    good = graph_bytes(model, [x])
    with CompilerClient(replica.address, timeout=60) as client:
        stub = client.stub

        def compile_(data: bytes, **kw: Any) -> Any:
            return lambda: stub.Compile(pb.CompileRequest(model=data, format=kw.pop("fmt", pb.MODEL_FORMAT_TESSERA_GRAPH),
                                                          wait=True, **kw), timeout=30)
        code, msg = _code(compile_(b"\x00garbage" * 10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a Tessera graph" in msg
        code, msg = _code(compile_(good[: len(good) // 2]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        code, msg = _code(compile_(b""))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in msg
        code, msg = _code(compile_(good, inputs=[pb.TensorSpec(shape=[3, 32], dtype="float32")]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "do not match" in msg
        code, msg = _code(compile_(good, target="cuda"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "cuda" in msg
        # an op the compiler does not know, named with where it is
        def rename_tanh(doc: dict[str, Any]) -> None:
            next(n for n in doc["nodes"] if n["op"] == "tanh")["op"] = "erfinv"
        code, msg = _code(compile_(edit(good, rename_tanh)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "unsupported op 'erfinv' at node" in msg
        # shapes that do not fit together

        def widen_first_matmul(doc: dict[str, Any]) -> None:
            next(n for n in doc["nodes"] if n["op"] == "matmul")["shape"] = [2, 65]
        code, msg = _code(compile_(edit(good, widen_first_matmul)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "node" in msg
        # corrupt torch.export bytes, then a program with an op outside the covered set
        code, msg = _code(compile_(b"PK\x03\x04junk", fmt=pb.MODEL_FORMAT_EXPORTED_PROGRAM,
                                   inputs=[pb.TensorSpec(shape=[2, 32], dtype="float32")]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "torch.export" in msg

        class Cumsum(torch.nn.Module):
            def forward(self, t: torch.Tensor) -> torch.Tensor:
                return torch.cumsum(t, 1) * 2

        code, msg = _code(compile_(exported(Cumsum(), [x]), fmt=pb.MODEL_FORMAT_EXPORTED_PROGRAM,
                                   inputs=[pb.TensorSpec(shape=[2, 32], dtype="float32")]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "cumsum" in msg and "unsupported" in msg
        # Run and GetArtifact
        info = client.compile(model, [x])
        code, msg = _code(lambda: stub.Run(pb.RunRequest(artifact_id=info.artifact_id, inputs=[tensor(np.zeros((3, 32), np.float32))]),
                                           timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "[3, 32]" in msg
        code, msg = _code(lambda: stub.Run(pb.RunRequest(artifact_id=info.artifact_id, inputs=[]), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        code, _ = _code(lambda: stub.GetArtifact(pb.GetArtifactRequest(artifact_id="0" * 32), timeout=10))
        assert code == grpc.StatusCode.NOT_FOUND
        code, _ = _code(lambda: stub.GetArtifact(pb.GetArtifactRequest(artifact_id="nope"), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        # nothing was changed by the bad calls: the good artifact still runs
        (y,) = client.run(info.artifact_id, [x.numpy()])
        np.testing.assert_allclose(y, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_job_survives_a_killed_replica(cluster: Cluster, replica: Proc) -> None:
    """Replica B takes the job, is killed mid-build; the job goes back on the stream and A finishes it."""
    torch.manual_seed(1)
    model, x = BertLayer(hidden=64, heads=4, ff=128).eval(), torch.randn(1, 16, 64)  # ~10 kernels: a build of a few seconds
    data = graph_bytes(model, [x])
    replica.proc.send_signal(signal.SIGSTOP)  # A stays registered but takes nothing: B gets the job
    try:
        b = cluster.compiler("compiler-b")
        with CompilerClient(b.address, timeout=60) as client:
            info = client.compile_bytes(data, wait=False)
            assert info.state == pb.ARTIFACT_STATE_QUEUED
            deadline = time.monotonic() + 60
            while (cur := client.artifact(info.artifact_id)).state != pb.ARTIFACT_STATE_COMPILING:
                assert time.monotonic() < deadline, "the job was never taken"
                time.sleep(0.05)
            assert cur.compiled_by == "compiler-b"
            b_attempt = cur.attempts
            b.proc.send_signal(signal.SIGKILL)
            b.proc.wait(10)
    finally:
        replica.proc.send_signal(signal.SIGCONT)
    with CompilerClient(replica.address, timeout=120) as client:
        deadline = time.monotonic() + 90
        while (cur := client.artifact(info.artifact_id)).state != pb.ARTIFACT_STATE_READY:
            assert cur.state != pb.ARTIFACT_STATE_FAILED, cur.error
            assert time.monotonic() < deadline, f"the job was lost (state {pb.ArtifactState.Name(cur.state)})"
            time.sleep(0.2)
        # A built it from another delivery than B's. Usually B had delivery 1 and A gets delivery 2; but A may
        # hold delivery 1 from a pull it issued before it was stopped, B then gets 2 when the ack wait ends.
        assert cur.compiled_by == "compiler-a" and cur.attempts != b_attempt and {cur.attempts, b_attempt} <= {1, 2, 3}
        (y,) = client.run(info.artifact_id, [x.numpy()])
        np.testing.assert_allclose(y, model(x).detach().numpy(), rtol=1e-4, atol=2e-5)


def test_stub_calls_carry_deadlines(replica: Proc) -> None:
    ch = grpc.insecure_channel(replica.address)
    stub = pb_grpc.CompilerServiceStub(ch)
    with pytest.raises(grpc.RpcError) as e:
        stub.Compile(pb.CompileRequest(model=b"x", format=pb.MODEL_FORMAT_UNSPECIFIED), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "format" in e.value.details()
    ch.close()


def test_compile_model_partitions_through_the_service(replica: Proc) -> None:
    """The client traces and partitions; each compiled subgraph is an artifact built by the replica and
    loaded here, and the LSTM runs in torch here, behind one callable."""
    torch.manual_seed(0)

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.lstm, self.out = torch.nn.Linear(6, 8), torch.nn.LSTM(8, 8, batch_first=True), torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            o, _ = self.lstm(torch.nn.functional.hardswish(self.inp(x)))
            return self.out(o).argmax(-1)
    model, x = Tagger().eval(), torch.randn(2, 4, 6)
    with CompilerClient(replica.address, timeout=120) as client:
        pm = client.compile_model(model, [x])
        assert [s.kind for s in pm.segments] == ["compiled", "torch", "compiled"]
        assert all(len(s.model.stats["artifact_id"]) == 32 for s in pm.compiled_segments)
        assert "unsupported module LSTM" in pm.report()
        got = pm(x)
        assert got.dtype == torch.int64 and torch.equal(got, model(x))
        with pytest.raises(InvalidArgumentError, match="1 unsupported op"):
            client.compile_model(model, [x], strict=True)
