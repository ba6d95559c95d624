"""Every configuration knob of Tessera, in one place.

Values come from the environment (``TESSERA_*``, plus the standard ``OTEL_*``
variables that the OpenTelemetry SDK reads itself) or from keyword arguments.
Services share one :class:`Settings`; a knob that only one service reads says so.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tessera.common.names import REFS_STALE_S
from tessera.common.names import SERVICES as SERVICES  # the six services, by their canonical (dashed) names


def default_run_dir() -> Path:
    """Where ``tessera up`` keeps pids, ports, logs and data: ``~/.tessera/run``."""
    return Path.home() / ".tessera" / "run"


class Settings(BaseSettings):
    """Typed settings; the environment variable of ``foo_bar`` is ``TESSERA_FOO_BAR``."""

    model_config = SettingsConfigDict(env_prefix="TESSERA_", extra="ignore", frozen=True)

    # --- infrastructure -------------------------------------------------------
    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server URL (JetStream enabled)")
    redis_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["redis://127.0.0.1:6379/0"],
        description="control-store: Redis shards, comma-separated; keys are hashed over them",
    )
    control_store_address: str = Field("127.0.0.1:50051", description="host:port of the control store's gRPC API")

    # --- credentials (a *_file setting, when set, wins over its value setting) ------
    auth_token: SecretStr = Field(SecretStr(""), description="shared token every gRPC call must carry as 'authorization: Bearer <token>'; empty: no authentication")
    auth_token_file: Path | None = Field(None, description="file holding auth_token (wins over auth_token when both are set)")
    nats_user: str = Field("", description="NATS user name (with nats_password); empty: the user of nats_url, if any")
    nats_password: SecretStr = Field(SecretStr(""), description="NATS password")
    nats_password_file: Path | None = Field(None, description="file holding nats_password (wins over nats_password)")
    redis_password: SecretStr = Field(SecretStr(""), description="control-store: Redis password (requirepass) of every shard")
    redis_password_file: Path | None = Field(None, description="file holding redis_password (wins over redis_password)")
    tls_cert_file: Path | None = Field(None, description="PEM certificate (chain) of this process's gRPC server; with tls_key_file, the server speaks only TLS")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_ca_file: Path | None = Field(None, description="PEM CA certificates; when set, every gRPC client connects with TLS and verifies the server against them")
    tls_server_name: str = Field("", description="name the servers' certificates carry, when it differs from the host of the address dialled")

    # --- this process's gRPC server ----------------------------------------------
    grpc_host: str = Field("127.0.0.1", description="interface the gRPC server binds (0.0.0.0 in containers)")
    grpc_port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    advertise_host: str = Field("", description="host others use to reach this process; default: grpc_host")
    instance_id: str = Field("", description="unique id of this replica; default: hostname-pid")
    shutdown_grace_s: float = Field(5.0, ge=0, description="seconds in-flight RPCs get after SIGTERM")

    # --- calls ---------------------------------------------------------------------
    rpc_timeout_s: float = Field(10.0, gt=0, description="deadline given to any gRPC call that sets none")
    grpc_max_message_bytes: int = Field(64 * 1024**2, ge=1024, description="largest gRPC message a server or channel sends or accepts; bigger ones get RESOURCE_EXHAUSTED")
    nats_request_timeout_s: float = Field(5.0, gt=0, description="deadline of a NATS request")
    gateway: str = Field("", description="host:port of a gateway (tessera-gateway) through which this process "
                         "reaches every replica, for a driver outside the cluster's network; the SDK also finds "
                         "one by itself when the address it is given answers as a gateway")
    client_mode: str = Field("auto", description="how this process reaches object bytes: local (map the node's "
                             "shared-memory arena), remote (stream them over gRPC) or auto (local when the arena "
                             "can be mapped here)")

    # --- liveness ------------------------------------------------------------------
    heartbeat_interval_s: float = Field(1.0, gt=0, description="how often nodes and services report in")
    refs_stale_s: float = Field(REFS_STALE_S, gt=0, description="a process's reference table older than this means the process is gone: what it borrowed is released (it refreshes its table at least three times within it)")
    node_timeout_s: float = Field(10.0, gt=0, description="control-store: a node silent this long is marked DEAD")
    instance_ttl_s: int = Field(15, gt=0, description="control-store: a service registration expires after this")

    # --- node ---------------------------------------------------------------------
    node_id: str = Field("", description="hex id of this node (16 bytes); default: derived from host and gRPC port")

    # --- object store ---------------------------------------------------------------
    object_store_memory: int = Field(0, ge=0, description="object-store: bytes of shared memory per node; 0: 30% of the "
                                     "node's memory (its cgroup limit in a container), capped by the free space of "
                                     "object_store_arena_dir (see tessera.common.sizing)")
    object_store_arena_dir: Path = Field(Path("/dev/shm"), description="object-store: where the shared-memory file lives")
    object_store_prefault: bool = Field(False, description="object-store: allocate and touch every arena page at start (fast first puts, memory held from the start); off: pages are taken on first write")
    object_store_warm_bytes: int = Field(256 * 1024**2, ge=0, description="object-store: bytes of the arena kept allocated and mapped ahead of the highest object so far (at most half the arena; none before the first object), so that the next large put or pull finds its pages ready; 0: none")
    object_store_spill_dir: Path | None = Field(None, description="object-store: spill directory (a folder per node id inside); default <run_dir>/spill")
    object_store_spill_capacity: int = Field(16 * 1024**3, ge=0, description="object-store: bytes of disk for spilled objects")
    object_store_inline_threshold: int = Field(100 * 1024, ge=0, description="objects up to this size travel inline in gRPC")
    object_store_chunk_bytes: int = Field(1024**2, gt=0, description="object-store: chunk size of node-to-node pulls")
    object_store_transfer_port: int = Field(0, ge=0, le=65535, description="object-store: TCP port of the node-to-node data socket (bound on grpc_host, advertised in the node's record); 0 picks a free one")

    # task scheduler (a node agent per node; the global scheduler runs beside it unless told otherwise)
    task_scheduler_role: str = Field("both", pattern="^(both|agent|global)$",
                                     description="task-scheduler: agent (node agent), global (global scheduler) or both")
    num_cpus: int = Field(0, ge=0, description="task-scheduler: CPUs this node offers to tasks; 0: the machine's count")
    num_gpus: int = Field(0, ge=0, description="task-scheduler: GPUs this node offers to tasks")
    node_resources: str = Field("", description='task-scheduler: custom resources as JSON, e.g. {"accelerator": 2}')
    task_scheduler_max_workers: int = Field(64, gt=0, description="task-scheduler: worker processes per node (besides actors)")
    task_scheduler_prestart_workers: int = Field(-1, ge=-1, description="task-scheduler: workers started up front; -1: one per CPU")
    task_scheduler_queue_per_cpu: float = Field(4.0, gt=0, description="task-scheduler: queued tasks per CPU before spilling")
    task_scheduler_flush_s: float = Field(0.05, ge=0, description="task-scheduler: how long small results and lineage gather before they are written")
    task_scheduler_unschedulable_s: float = Field(30.0, ge=0, description="task-scheduler: how long a task no node can run waits for one")

    # --- launcher ------------------------------------------------------------------
    run_dir: Path = Field(default_factory=default_run_dir, description="tessera up: pids, ports, logs and data")
    redis_shards: int = Field(1, ge=1, le=64, description="tessera up: Redis shards to start when none are given")

    # --- logging -------------------------------------------------------------------
    log_level: str = Field("INFO", description="Python log level")
    log_format: Literal["text", "json"] = Field("text", description="log lines as text, or as one JSON object "
                                                "a line carrying trace_id and span_id")
    log_max_bytes: int = Field(64 * 2**20, ge=0, description="a log file (a service's under tessera up, a worker's) "
                               "is rotated past this size; 0: never")
    log_backups: int = Field(5, ge=0, le=100, description="rotated copies kept of each log file (NAME.1 newest)")
    worker_log_dir: Path | None = Field(None, description="task-scheduler: where workers' stdout and stderr go (a "
                                        "folder per node id inside); default <run_dir>/logs/workers")

    # --- metrics -------------------------------------------------------------------
    metrics_port: int | None = Field(None, ge=0, le=65535, description="port of this process's Prometheus "
                                     "/metrics endpoint; 0 picks a free one; unset serves none")

    # serving (white-box pipelines; HTTP/JSON beside gRPC; one stage scheduler per replica)
    gateway_http_port: int = Field(0, ge=0, le=65535, description="gateway: port of the HTTP relay to serving "
                                   "replicas' HTTP front ends; 0 picks a free one")
    dashboard_port: int = Field(8265, ge=0, le=65535, description="dashboard: HTTP port (Ray's 8265); 0 picks a "
                                "free one")
    jaeger_ui_url: str = Field("", validation_alias=AliasChoices("TESSERA_JAEGER_UI_URL", "JAEGER_UI_URL"),
                               description="dashboard: base URL of Jaeger's UI (http://host:16686), to link each "
                               "task and request to its trace; empty shows trace ids unlinked")
    serving_http_port: int = Field(8000, ge=0, le=65535, description="serving: port of the HTTP front end "
                                   "(/v1 JSON and KServe v2), the same in every container; 0 picks a free one "
                                   "(tessera up picks a free one unless this is set)")
    serving_http_max_body_bytes: int = Field(16 * 2**20, gt=0, description="serving: largest HTTP request body; "
                                             "a longer one gets 413 before it is read")
    serving_workers: int = Field(2, gt=0, description="serving: shared executor threads of the stage scheduler")
    serving_reserved_workers: int = Field(1, ge=0, description="serving: executor threads reserved for pipelines "
                                                              "registered as latency-critical")
    serving_cache_bytes: int = Field(64 * 2**20, ge=0, description="serving: bound of the cache of featurizer "
                                                                    "outputs kept across requests; 0 turns it off")
    serving_max_batch: int = Field(64, gt=0, description="serving: most records the scheduler puts in one batch")
    serving_latency_budget_ms: float = Field(2.0, ge=0, description="serving: default batching reservation of a pipeline")
    serving_max_records: int = Field(4096, gt=0, description="serving: most records in one predict request")
    serving_max_text_chars: int = Field(100_000, gt=0, description="serving: longest text field accepted")
    serving_max_queued_records: int = Field(65536, gt=0, description="serving: records waiting for the stage scheduler; a request past it gets RESOURCE_EXHAUSTED")
    serving_blackbox_stages: bool = Field(True, description="serving: accept opaque scikit-learn steps (their pickles, "
                                          "run in a worker process of the server); off: INVALID_ARGUMENT")
    serving_compile_dense: bool = Field(True, description="serving: compile dense heads (MLPs, torch modules, linear "
                                        "heads over dense input) through the cluster's compiler at registration")

    # gpu-scheduler (Gandiva: a scheduler per cluster, a node agent per node)
    gpus_per_node: int = Field(0, ge=0, le=64, description="gpu-scheduler: virtual GPU slots of a node agent when NVML finds no GPU")
    gpu_scheduler_policy: str = Field("gandiva", pattern="^(gandiva|fifo|las)$", description="gpu-scheduler: gandiva, fifo or las")
    gpu_scheduler_quantum_s: float = Field(10.0, gt=0, description="gpu-scheduler: time slice when GPUs are oversubscribed")
    gpu_scheduler_tick_s: float = Field(0.25, gt=0, description="gpu-scheduler: how often the scheduler reconciles and agents report")
    gpu_scheduler_agent_timeout_s: float = Field(5.0, gt=0, description="gpu-scheduler: a node agent silent this long is dead; its jobs are requeued")
    gpu_scheduler_packing: bool = Field(False, description="gpu-scheduler: pack jobs on shared GPUs when introspection shows a gain")
    gpu_scheduler_prewarm: bool = Field(True, description="gpu-scheduler: a node agent keeps one job runner with torch imported, ready")
    gpu_scheduler_migrate_ahead: bool = Field(True, description="gpu-scheduler: a migration starts its target process (on free "
                                              "GPUs) while the source checkpoints; it waits for the checkpoint (false: after the source exits)")
    gpu_scheduler_feedback_stop_below: float = Field(
        0.0, ge=0, le=1, description="gpu-scheduler: early feedback stops a group's job whose reported accuracy is below "
        "this fraction of the group's best (0: never stop; jobs trailing the best by 10% are deprioritized anyway)")

    # --- compiler ------------------------------------------------------------------
    compiler_cache_dir: Path | None = Field(None, description="compiler: compile cache (shared libraries by content hash); default ~/.cache/tessera/compiler")
    compiler_job_ack_wait_s: float = Field(30.0, gt=0, description="compiler: a job not acked (nor heartbeated) this long goes to another replica")
    compiler_job_max_deliver: int = Field(5, ge=1, description="compiler: deliveries of one compile job before it is dropped")
    compiler_compile_timeout_s: float = Field(600.0, gt=0, description="compiler: longest a waiting Compile call waits when its deadline is longer")
    compiler_loaded_artifacts: int = Field(8, ge=1, description="compiler: artifacts a replica keeps loaded for Run")

    @field_validator("redis_urls", mode="before")
    @classmethod
    def _split_urls(cls, v: object) -> object:
        if isinstance(v, str):
            return [u.strip() for u in v.split(",") if u.strip()]
        return v

    @field_validator("redis_urls")
    @classmethod
    def _check_urls(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one Redis URL is required")
        for u in v:
            if not u.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError(f"not a Redis URL: {u!r}")
        return v

    @cached_property
    def resolved_instance_id(self) -> str:
        return self.instance_id or f"{os.uname().nodename}-{os.getpid()}"


_current: tuple[tuple[tuple[str, str], ...], Settings] | None = None


def current_settings() -> Settings:
    """``Settings()`` of the environment as it is now, built again only when a ``TESSERA_*`` variable (or
    ``HOME``) changed: building one costs milliseconds, and clients need it for every channel they open."""
    global _current
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.upper().startswith("TESSERA_") or k == "HOME"))
    cached = _current
    if cached is not None and cached[0] == key:
        return cached[1]
    s = Settings()  # type: ignore[call-arg]  # every field has a default (mypy reads the Field() calls without pydantic)
    _current = (key, s)
    return s


def otel_service_name(default: str) -> str:
    """``OTEL_SERVICE_NAME`` if set (the standard variable), else ``default``."""
    return os.environ.get("OTEL_SERVICE_NAME") or default
