"""Wiring of one serving replica: engine + scheduler, the cluster registry (control store)
and parameters (object store), gRPC and HTTP front ends (JSON and KServe v2), NATS for registry changes
and for predictions through the queue group ``serving``.

NATS subjects:
- ``tessera.events.kv.serving-pipelines.<op>`` (from the control store): every replica
  follows registry changes.
- ``tessera.serving.predict`` (queue group ``serving``): a JSON request
  ``{"pipeline": name, "records": [...]}`` answered by one replica with
  ``{"predictions": [...]}`` or ``{"error": {...}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict
from typing import Any

from nats.aio.msg import Msg

from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.serving.v1 import serving_pb2 as pb
from tessera.common import auth, rpc
from tessera.common.config import Settings
from tessera.common.errors import InvalidArgumentError, TesseraError
from tessera.common.metrics import observe
from tessera.common.registry import control_store_aio_stub
from tessera.common.service import ServiceApp
from tessera.serving import workers
from tessera.serving.cluster import PIPELINES, ClusterStore
from tessera.serving.compiled import CompilerLink
from tessera.serving.engine import Engine
from tessera.serving.http import HttpFrontEnd
from tessera.serving.replica import Replica
from tessera.serving.scheduler import Scheduler
from tessera.serving.servicer import ServingServicer

NAME = "serving"
SERVICE = "tessera.serving.v1.ServingService"
PREDICT_SUBJECT = "tessera.serving.predict"
QUEUE = "serving"

log = logging.getLogger(__name__)

_OPS = {cpb.CHANGE_OP_CREATED: "created", cpb.CHANGE_OP_UPDATED: "updated", cpb.CHANGE_OP_DELETED: "deleted"}


def observe_replica(engine: Engine, scheduler: Scheduler) -> None:
    """The replica's figures as metrics, read at each collection: shared-stage reuse (rows a shared featurizer
    computed once for several pipelines of a batch), the cache of featurizer outputs kept across requests,
    pipelines, queued records, batches."""
    scope = "tessera.serving"
    observe(scope, "tessera.serving.rows", lambda: [(engine.rows_computed, {"tessera.serving.row": "computed"}),
                                                    (engine.rows_reused, {"tessera.serving.row": "reused"})],
            kind="counter", unit="{row}", description="Rows of shared stages computed, and reused instead of computed")
    cache = engine.cache
    observe(scope, "tessera.serving.cache.lookups", lambda: [(cache.hits, {"tessera.serving.cache.result": "hit"}),
                                                             (cache.misses, {"tessera.serving.cache.result": "miss"})],
            kind="counter", unit="{lookup}", description="Featurizer inputs looked up in the cache of outputs kept "
                                                        "across requests, found (hit) or featurized (miss)")
    observe(scope, "tessera.serving.cache.hit_rate", lambda: cache.hit_rate, unit="1",
            description="Share of featurizer inputs found in the cache since the replica started")
    observe(scope, "tessera.serving.cache.size", lambda: cache.bytes, unit="By",
            description="Bytes the cache of featurizer outputs holds (bounded by serving_cache_bytes)")
    observe(scope, "tessera.serving.cache.evictions", lambda: cache.evictions, kind="counter", unit="{entry}",
            description="Cache entries evicted to stay within the bound")
    observe(scope, "tessera.serving.pipelines", lambda: len(engine.pipelines), unit="{pipeline}",
            description="Pipelines loaded in this replica")
    observe(scope, "tessera.serving.queued", lambda: scheduler.queued, unit="{record}",
            description="Records waiting for the stage scheduler")
    observe(scope, "tessera.serving.batches", lambda: scheduler.batches, kind="counter", unit="{batch}",
            description="Batches the source stages (featurizers) ran")
    observe(scope, "tessera.serving.stage.batches",
            lambda: [(scheduler.stage_batches - scheduler.reserved_runs, {"tessera.serving.executor": "shared"}),
                     (scheduler.reserved_runs, {"tessera.serving.executor": "reserved"})],
            kind="counter", unit="{batch}", description="Batches of every stage the executors ran, by executor kind")


def build(settings: Settings) -> ServiceApp:
    app = ServiceApp(NAME, settings)
    channel, stub = control_store_aio_stub(settings)
    cluster = ClusterStore(stub, timeout=settings.rpc_timeout_s)
    compiler = CompilerLink(settings) if settings.serving_compile_dense else None
    engine = Engine(max_records=settings.serving_max_records, max_text_chars=settings.serving_max_text_chars,
                    blackbox=settings.serving_blackbox_stages, compiler=compiler, cache_bytes=settings.serving_cache_bytes)
    scheduler = Scheduler(engine, workers=settings.serving_workers, reserved=settings.serving_reserved_workers,
                          max_batch=settings.serving_max_batch, max_queued=settings.serving_max_queued_records)
    replica = Replica(engine, scheduler, cluster, instance_id=settings.resolved_instance_id,
                      default_budget_ms=settings.serving_latency_budget_ms)
    # the HTTP front end requires the same token as the gRPC server (none when authentication is off)
    http = HttpFrontEnd(replica.predict, cluster.pipeline_names, replica.ensure, token=auth.server_token(settings),
                        max_body=settings.serving_http_max_body_bytes, ready=lambda: app.serving)
    servicer = ServingServicer(replica)
    descriptor = pb.DESCRIPTOR.services_by_name["ServingService"]
    app.add_servicer(lambda s, srv: rpc.add_servicer(s, srv, descriptor), servicer, SERVICE)

    async def on_registry_change(msg: Msg) -> None:
        ev = cpb.ChangeEvent.FromString(msg.data)
        op = _OPS.get(ev.op)
        if op is None:
            return
        for ch in ev.changes:
            spec = pb.PipelineSpec.FromString(ch.value) if ch.value else None
            await replica.on_change(op, ch.key.decode(), spec)

    async def on_predict(msg: Msg) -> None:
        assert app.bus is not None
        out: dict[str, Any]
        try:
            try:
                req = json.loads(msg.data)
                name, records = req["pipeline"], req["records"]
                if not isinstance(name, str) or not isinstance(records, list):
                    raise TypeError("pipeline must be a string and records a list")
            except (ValueError, KeyError, TypeError) as e:
                raise InvalidArgumentError(f'expected {{"pipeline": name, "records": [...]}}: {e}') from None
            preds = await replica.predict(name, records)
            out = {"predictions": [asdict(p) for p in preds]}
        except TesseraError as e:
            out = {"error": {"code": e.code, "message": str(e)}}
        except Exception as e:
            log.exception("NATS predict")
            out = {"error": {"code": "INTERNAL", "message": f"{type(e).__name__}: {e}"}}
        await app.bus.respond(msg, json.dumps(out, separators=(",", ":")).encode())

    async def start() -> None:
        assert app.bus is not None
        scheduler.start()
        port = await http.start(settings.grpc_host, settings.serving_http_port)
        host = app.address.rsplit(":", 1)[0]
        servicer.http_address = app.http_address = f"{host}:{port}"  # registered with the replica (gateways relay to it)
        await app.bus.subscribe(f"tessera.events.kv.{PIPELINES}.>", on_registry_change)
        await app.bus.subscribe(PREDICT_SUBJECT, on_predict, queue=QUEUE)
        log.info("serving: HTTP (JSON, KServe v2) on %s, NATS %s (queue %s)", servicer.http_address, PREDICT_SUBJECT, QUEUE)

    async def stop() -> None:
        await http.stop()
        await scheduler.stop()
        await asyncio.to_thread(workers.shutdown)  # the worker processes of opaque stages, if any ran
        await cluster.close()
        await channel.close()

    app.on_start(start)
    app.on_stop(stop)
    observe_replica(engine, scheduler)
    return app


async def serve(settings: Settings | None = None) -> None:
    await build(settings or Settings()).run()
