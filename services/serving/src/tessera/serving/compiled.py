"""Dense heads compiled into fused C kernels by the cluster's compiler service.

At registration the Oven hands each dense stage (an MLP, a torch module, a linear head over
dense input) to :class:`CompilerLink`: its layers become a compiler graph (matmul + bias +
activation per layer), compiled by whichever compiler replica takes the job, for two batch
shapes (one row, and chunks of :data:`CHUNK` rows, the last one padded). The artifacts'
shared libraries are loaded into this process and called directly: no remote call per
prediction. Kernels compute in float32, as the compiler does.

No compiler registered, the compiler's runtime not installed here, or a compile that fails:
the stage stays on numpy, with a logged warning. The compile is a child span of the
registration's trace.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from opentelemetry import trace

from tessera.common import rpc
from tessera.common.config import Settings
from tessera.serving.models import DenseKernel, Layer

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("tessera.serving")

CHUNK = 32  # rows per call of the batch kernel
SERVICE = "tessera.compiler.v1.CompilerService"
LOOKUP_S = 5.0  # how long the list of compiler replicas is reused


def dense_graph(layers: Sequence[Layer], rows: int) -> Any:
    """The compiler graph of dense layers for ``rows`` input rows: matmul and bias per linear
    layer, the activations between them."""
    from tessera.compiler.ir import GraphBuilder, Node, Op

    b = GraphBuilder()
    first = next(w for kind, w, _ in layers if kind == "linear")
    assert first is not None
    h = b.input((rows, int(first.shape[0])), name="x")
    width = int(first.shape[0])
    acts = {"relu": Op.RELU, "tanh": Op.TANH, "sigmoid": Op.SIGMOID}
    for i, (kind, w, bias) in enumerate(layers):
        if kind == "linear":
            assert w is not None and bias is not None
            wi = b.const(np.asarray(w, dtype=np.float32), name=f"w{i}")
            width = int(w.shape[1])
            h = b.add(Node(Op.MATMUL, (h, wi), (rows, width)))
            bi = b.const(np.asarray(bias, dtype=np.float32).reshape(width), name=f"b{i}")
            h = b.add(Node(Op.ADD, (h, bi), (rows, width)))
        else:
            h = b.add(Node(acts[kind], (h,), (rows, width)))
    return b.build([h])


class Kernel:
    """Compiled dense layers: a one-row model and a :data:`CHUNK`-row one, called under a lock
    (a compiled model runs in one arena)."""

    def __init__(self, one: Any, chunk: Any, n_in: int, n_out: int, artifacts: list[str]) -> None:
        self.one, self.chunk = one, chunk
        self.n_in, self.n_out = n_in, n_out
        self.artifacts = artifacts
        self._lock = threading.Lock()
        self._x1 = np.empty((1, n_in), np.float32)
        self._y1 = np.empty((1, n_out), np.float32)
        self._xc = np.empty((CHUNK, n_in), np.float32)
        self._yc = np.empty((CHUNK, n_out), np.float32)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        n = X.shape[0]
        out = np.empty((n, self.n_out), np.float64)
        with self._lock:
            if n == 1:
                self._x1[:] = X
                self.one.run([self._x1], [self._y1])
                out[:] = self._y1
                return out
            for s in range(0, n, CHUNK):
                m = min(CHUNK, n - s)
                self._xc[:m] = X[s:s + m]
                self._xc[m:] = 0.0
                self.chunk.run([self._xc], [self._yc])
                out[s:s + m] = self._yc[:m]
        return out


class CompilerLink:
    """Finds the cluster's compiler (the control store's instances of ``compiler``) and builds kernels with it."""

    def __init__(self, settings: Settings, *, timeout_s: float = 300.0) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._seen: tuple[float, list[str]] = (0.0, [])
        self._lock = threading.Lock()
        self.compiled = 0
        self.fallbacks = 0

    def _compilers(self) -> list[str]:
        with self._lock:
            at, addrs = self._seen
            if time.monotonic() - at < LOOKUP_S:
                return addrs
        from tessera.api.control_store.v1 import control_store_pb2 as cpb
        from tessera.common.registry import control_store_stub

        ch, stub = control_store_stub(self.settings.control_store_address)
        with ch:
            inst = stub.ListInstances(cpb.ListInstancesRequest(service="compiler"), timeout=10.0).instances
        addrs = sorted({i.address for i in inst})
        with self._lock:
            self._seen = (time.monotonic(), addrs)
        return addrs

    def compile(self, pipeline: str, layers: Sequence[Layer]) -> DenseKernel | None:
        """Kernels for ``layers``, or None (with a warning) when there is no compiler or the compile fails."""
        with _tracer.start_as_current_span("serving.compile") as span:
            span.set_attribute("tessera.pipeline", pipeline)
            span.set_attribute("tessera.serving.layers", len(layers))
            try:
                try:
                    import tessera.compiler.runtime  # noqa: F401  (the runtime that loads artifacts)
                except ImportError:
                    span.set_attribute("tessera.serving.compiled", False)
                    self.fallbacks += 1
                    log.warning("pipeline %s: dense stage on numpy: the compiler runtime (tessera-compiler) is not "
                                "installed in this process", pipeline)
                    return None
                addrs = self._compilers()
                if not addrs:
                    span.set_attribute("tessera.serving.compiled", False)
                    self.fallbacks += 1
                    log.warning("pipeline %s: dense stage on numpy: no compiler is registered in the cluster", pipeline)
                    return None
                kernel = self._build(addrs[0], layers)
            except Exception as e:
                span.record_exception(e)
                span.set_attribute("tessera.serving.compiled", False)
                self.fallbacks += 1
                log.warning("pipeline %s: dense stage on numpy: the compile failed: %s: %s", pipeline,
                            type(e).__name__, e)
                return None
            span.set_attribute("tessera.serving.compiled", True)
            span.set_attribute("tessera.compiler.artifacts", ",".join(kernel.artifacts))
            self.compiled += 1
            log.info("pipeline %s: dense stage compiled (artifacts %s)", pipeline, ", ".join(kernel.artifacts))
            return kernel

    def _build(self, address: str, layers: Sequence[Layer]) -> Kernel:
        from tessera.api.compiler.v1 import compiler_pb2 as cpb
        from tessera.api.compiler.v1 import compiler_pb2_grpc as cpb_grpc
        from tessera.compiler.runtime import load_artifact
        from tessera.compiler.serialize import dump_graph

        linears = [w for kind, w, _ in layers if kind == "linear"]
        n_in, n_out = int(linears[0].shape[0]), int(linears[-1].shape[1])  # type: ignore[union-attr]
        models, ids = [], []
        with rpc.channel(address, service=SERVICE, idempotent_methods=("GetArtifact",),
                         default_timeout=self.timeout_s) as ch:
            stub = cpb_grpc.CompilerServiceStub(ch)
            for rows in (1, CHUNK):
                req = cpb.CompileRequest(model=dump_graph(dense_graph(layers, rows)),
                                         format=cpb.MODEL_FORMAT_TESSERA_GRAPH, target="c", wait=True)
                info = stub.Compile(req, timeout=self.timeout_s).artifact
                if info.state != cpb.ARTIFACT_STATE_READY:
                    raise RuntimeError(f"artifact {info.artifact_id} is {cpb.ArtifactState.Name(info.state)}: {info.error}")
                got = stub.GetArtifact(cpb.GetArtifactRequest(artifact_id=info.artifact_id, include_bundle=True),
                                       timeout=self.timeout_s)
                models.append(load_artifact(got.bundle))
                ids.append(info.artifact_id)
        return Kernel(models[0], models[1], n_in, n_out, ids)
