"""A minimal OTLP/gRPC trace receiver for the compose tests where Jaeger's image cannot be pulled:
it listens on ``--host``:``--port`` and appends each span it receives, one JSON object per line, to
``--out`` (service, name, trace_id, span_id, parent_span_id). scripts/compose_test.sh starts it on the
host before the stack, points every service at it (OTEL_COLLECTOR_ENDPOINT, through
host.containers.internal), and e2e-tests/test_compose.py reads the file to assert trace edges.

    python scripts/otlp_sink.py --port 14317 --out /tmp/spans.jsonl
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC method name
        lines = []
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    lines.append(json.dumps({"service": service, "name": s.name, "trace_id": s.trace_id.hex(),
                                             "span_id": s.span_id.hex(), "parent_span_id": s.parent_span_id.hex()}))
        with self.lock, open(self.path, "a") as f:
            f.write("".join(line + "\n" for line in lines))
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=14317)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(args.out), server)
    server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"otlp_sink: listening on {args.host}:{args.port}, spans to {args.out}", flush=True)
    stop.wait()
    server.stop(2)


if __name__ == "__main__":
    main()
