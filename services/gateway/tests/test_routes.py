"""The gateway's route table: only registered replicas are dialed; calls naming none go to their service."""

from __future__ import annotations

import pytest

from tessera.gateway.routes import Replica, RouteError, RouteTable, service_of


def table() -> RouteTable:
    t = RouteTable("control-store:50051")
    t.update([Replica("task-scheduler", "node-a:50053"), Replica("task-scheduler", "node-b:50053"),
              Replica("serving", "serving-1:50056", "serving-1:8000"), Replica("serving", "serving-2:50056"),
              Replica("compiler", "compiler-1:50054")])
    return t


def test_a_named_replica_is_dialed_only_when_registered() -> None:
    t = table()
    assert t.resolve("node-b:50053", "/tessera.task_scheduler.v1.TaskSchedulerService/Session") == "node-b:50053"
    assert t.resolve("control-store:50051", "/grpc.health.v1.Health/Check") == "control-store:50051"
    with pytest.raises(RouteError, match="no replica is registered at 10.0.0.9:22"):
        t.resolve("10.0.0.9:22", "/tessera.compiler.v1.CompilerService/Compile")


def test_a_call_naming_no_replica_goes_to_its_service() -> None:
    t = table()
    assert t.resolve("", "/tessera.control_store.v1.ControlStoreService/ListInstances") == "control-store:50051"
    assert t.resolve("", "/tessera.compiler.v1.CompilerService/Compile") == "compiler-1:50054"
    picked = {t.resolve("", "/tessera.task_scheduler.v1.TaskSchedulerService/Session") for _ in range(4)}
    assert picked == {"node-a:50053", "node-b:50053"}  # in turn
    with pytest.raises(RouteError, match="no gpu-scheduler replica is registered"):
        t.resolve("", "/tessera.gpu_scheduler.v1.GpuSchedulerService/SubmitJob")
    with pytest.raises(RouteError, match="must name its replica"):
        t.resolve("", "/grpc.health.v1.Health/Check")


def test_http_goes_only_to_replicas_with_a_front_end() -> None:
    t = table()
    assert {t.pick("serving", http=True).http_address for _ in range(3)} == {"serving-1:8000"}
    t.update([])
    with pytest.raises(RouteError, match="no serving replica with an HTTP front end"):
        t.pick("serving", http=True)


def test_service_of() -> None:
    assert service_of("/tessera.object_store.v1.ObjectStoreService/WriteObject") == "object-store"
    assert service_of("/grpc.health.v1.Health/Check") == ""
    assert service_of("garbage") == ""
