"""A client of the compiler service: compile a module remotely, run it there, fetch the bundle.

    with CompilerClient() as c:                   # the compiler of the local `tessera up` cluster
        info = c.compile(model, [x])              # traced here, built by some compiler replica
        y = c.run(info.artifact_id, [x.numpy()])
        local = c.load(info.artifact_id)          # the artifact as an in-process CompiledModel
        model = c.compile_model(model, [x])       # subgraphs built by the service, unsupported ops in torch
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tessera.api.compiler.v1 import compiler_pb2 as pb
from tessera.api.compiler.v1 import compiler_pb2_grpc as pb_grpc
from tessera.common import rpc
from tessera.compiler.runtime import CompiledModel, load_artifact

SERVICE = "tessera.compiler.v1.CompilerService"


def compiler_address(address: str | None = None) -> str:
    """The compiler of the cluster found the usual way (``TESSERA_ADDRESS`` / the run directory)."""
    from tessera.api.control_store.v1 import control_store_pb2 as cpb
    from tessera.client._discovery import find_cluster
    from tessera.common.registry import control_store_stub

    cluster = find_cluster(address)
    svc = cluster.services.get("compiler") if cluster.services else None
    if svc and svc.get("address"):
        return str(svc["address"])
    ch, stub = control_store_stub(cluster.control_store_address)
    with ch:
        inst = stub.ListInstances(cpb.ListInstancesRequest(service="compiler"), timeout=10).instances
    if not inst:
        raise ConnectionError("no compiler is registered in the cluster")
    return str(inst[0].address)


def tensor(a: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(a)
    return pb.Tensor(shape=list(a.shape), dtype=str(a.dtype), data=a.tobytes())


class CompilerClient:
    def __init__(self, address: str | None = None, *, timeout: float = 600.0) -> None:
        """``address``: host:port of a compiler replica; default: the cluster's (see :func:`compiler_address`)."""
        self.address = address or compiler_address()
        self.timeout = timeout
        self._channel = rpc.channel(self.address, service=SERVICE, idempotent_methods=("GetArtifact",), default_timeout=timeout)
        self.stub = pb_grpc.CompilerServiceStub(self._channel)

    def __enter__(self) -> CompilerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def compile(self, module: Any, example_inputs: Sequence[Any], *, target: str = "c", wait: bool = True,
                timeout: float | None = None) -> pb.ArtifactInfo:
        from tessera.compiler.frontend import from_torch
        from tessera.compiler.serialize import dump_graph

        graph = from_torch(module, example_inputs)
        return self.compile_bytes(dump_graph(graph), target=target, wait=wait, timeout=timeout)

    def compile_model(self, module: Any, example_inputs: Sequence[Any], *, strict: bool = False, keep_faster: bool = False,
                      target: str = "c", timeout: float | None = None) -> Any:
        """``module`` as one local callable whose compiled subgraphs are built by the service (each one an
        artifact, fetched and loaded here) and whose ops the compiler does not cover run in torch here:
        a :class:`CompiledModel` when the whole model compiles, else a
        :class:`~tessera.compiler.partition.PartitionedModel` (``.report()`` gives the partition).
        ``strict=True`` refuses a model with unsupported ops, naming each one and its line, before any request."""
        from tessera.compiler.api import compile as compile_module
        from tessera.compiler.serialize import dump_graph

        def build(graph: Any) -> CompiledModel:
            info = self.compile_bytes(dump_graph(graph), target=target, wait=True, timeout=timeout)
            model = self.load(info.artifact_id, timeout=timeout)
            model.stats["artifact_id"] = info.artifact_id
            return model
        return compile_module(module, example_inputs, strict=strict, keep_faster=keep_faster, compile_segment=build)

    def compile_bytes(self, model: bytes, *, fmt: pb.ModelFormat.ValueType = pb.MODEL_FORMAT_TESSERA_GRAPH, inputs: Sequence[pb.TensorSpec] = (),
                      target: str = "c", wait: bool = True, timeout: float | None = None) -> pb.ArtifactInfo:
        req = pb.CompileRequest(model=model, format=fmt, inputs=list(inputs), target=target, wait=wait)
        return self.stub.Compile(req, timeout=timeout or self.timeout).artifact

    def run(self, artifact_id: str, inputs: Sequence[np.ndarray], *, timeout: float | None = None) -> list[np.ndarray]:
        r = self.stub.Run(pb.RunRequest(artifact_id=artifact_id, inputs=[tensor(a) for a in inputs]),
                          timeout=timeout or 60.0)
        return [np.frombuffer(t.data, np.float32).reshape(tuple(t.shape)) for t in r.outputs]

    def artifact(self, artifact_id: str, *, timeout: float | None = None) -> pb.ArtifactInfo:
        return self.stub.GetArtifact(pb.GetArtifactRequest(artifact_id=artifact_id), timeout=timeout or 30.0).artifact

    def load(self, artifact_id: str, *, timeout: float | None = None) -> CompiledModel:
        r = self.stub.GetArtifact(pb.GetArtifactRequest(artifact_id=artifact_id, include_bundle=True), timeout=timeout or 60.0)
        return load_artifact(r.bundle)
