"""The public surface of the SDK, pinned: changing it must show up as a reviewed diff here."""

from __future__ import annotations

import importlib
import pkgutil
import queue

import tessera
import tessera.client

EXPECTED_TESSERA = ["ActorClass", "ActorHandle", "Client", "ClusterNotFoundError", "DynamicObjectRefGenerator", "Event",
                    "ObjectRef", "ObjectRefGenerator", "ObjectStoreClient", "RemoteFunction", "__version__",
                    "available_resources", "cancel", "cluster_resources", "connect", "exceptions", "get", "get_actor",
                    "get_gpu_ids", "get_runtime_context", "init", "internal", "is_initialized", "kill", "method", "nodes",
                    "put", "remote", "shutdown", "timeline", "util", "wait"]
EXPECTED_UTIL = ["ActorPool", "PlacementGroup", "get_placement_group", "placement_group", "placement_group_table",
                 "remove_placement_group", "scheduling_strategies"]
EXPECTED_QUEUE = ["Empty", "Full", "Queue"]
EXPECTED_STATE = ["COLUMNS", "RESOURCES", "get_log", "list_actors", "list_jobs", "list_nodes", "list_objects", "list_pipelines",
                  "list_placement_groups", "list_state", "list_tasks", "summarize_actors", "summarize_objects", "summarize_tasks"]
EXPECTED_EXCEPTIONS = ["ActorDiedError", "GetTimeoutError", "ObjectFreedError", "ObjectLostError", "ObjectStoreFullError",
                       "OwnerDiedError", "RuntimeEnvSetupError", "TaskCancelledError", "TaskError", "TaskUnschedulableError", "TesseraSDKError",
                       "WorkerCrashedError"]
EXPECTED_CLIENT = ["Client", "ClusterInfo", "ClusterNotFoundError", "Event", "connect", "find_cluster"]

#: Every distribution contributes one subpackage of the shared ``tessera`` namespace.
SUBPACKAGES = ["api", "client", "common", "compiler", "control_store", "gpu_scheduler", "object_store", "serving",
               "task_scheduler", "testing"]


def test_tessera_exports() -> None:
    assert sorted(tessera.__all__) == EXPECTED_TESSERA
    for name in tessera.__all__:
        assert hasattr(tessera, name), name


def test_util_exports() -> None:
    import tessera.util.queue
    import tessera.util.state

    assert sorted(tessera.util.__all__) == EXPECTED_UTIL
    assert sorted(tessera.util.queue.__all__) == EXPECTED_QUEUE
    assert sorted(tessera.util.state.__all__) == EXPECTED_STATE
    for name in tessera.util.__all__:
        assert hasattr(tessera.util, name), name
    assert issubclass(tessera.util.queue.Empty, queue.Empty) and issubclass(tessera.util.queue.Full, queue.Full)


def test_exception_exports() -> None:
    assert sorted(tessera.exceptions.__all__) == EXPECTED_EXCEPTIONS


def test_client_exports() -> None:
    assert sorted(tessera.client.__all__) == EXPECTED_CLIENT
    for name in tessera.client.__all__:
        assert hasattr(tessera.client, name), name


def test_every_distribution_shares_the_tessera_namespace() -> None:
    found = {m.name for m in pkgutil.iter_modules(tessera.__path__) if not m.name.startswith("_")}
    assert set(SUBPACKAGES) <= found, sorted(found)
    for name in SUBPACKAGES:
        importlib.import_module(f"tessera.{name}")
    for svc in ["control_store", "object_store", "task_scheduler", "compiler", "gpu_scheduler", "serving"]:
        assert callable(importlib.import_module(f"tessera.{svc}.__main__").main)
