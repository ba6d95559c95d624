"""Cross-cutting code shared by every Tessera service: the one home of

- :mod:`~tessera.common.config` — typed settings (``TESSERA_*``, ``OTEL_*``);
- :mod:`~tessera.common.telemetry` — tracer provider, OTLP export, log format;
- :mod:`~tessera.common.bus` — NATS with W3C trace context on every hop, JetStream;
- :mod:`~tessera.common.rpc` — gRPC servers/channels: deadlines, retries, error mapping;
- :mod:`~tessera.common.service` — the shared life cycle of a service replica;
- :mod:`~tessera.common.registry` — control-store client and instance registration;
- :mod:`~tessera.common.errors` — typed errors mapped once to gRPC status codes;
- :mod:`~tessera.common.ids` — fixed-length binary ids;
- :mod:`~tessera.common.procs` — starting nats-server / redis-server.
"""
