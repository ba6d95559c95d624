from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from tessera.common.config import SERVICES, Settings, default_run_dir, otel_service_name


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("TESSERA_") or k == "OTEL_SERVICE_NAME":
            monkeypatch.delenv(k)


def test_defaults() -> None:
    s = Settings()
    assert s.nats_url == "nats://127.0.0.1:4222"
    assert s.redis_urls == ["redis://127.0.0.1:6379/0"]
    assert s.control_store_address == "127.0.0.1:50051"
    assert s.grpc_host == "127.0.0.1"
    assert s.grpc_port == 0
    assert s.rpc_timeout_s == 10.0
    assert s.node_timeout_s == 10.0
    assert s.instance_ttl_s == 15
    assert s.run_dir == Path.home() / ".tessera" / "run" == default_run_dir()
    assert s.log_level == "INFO"
    assert len(SERVICES) == 7 and "dashboard" in SERVICES and "control-store" in SERVICES


def test_redis_urls_comma_separated_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_REDIS_URLS", " redis://10.0.0.1:6379/0 ,redis://10.0.0.2:6380/1,, unix:///tmp/r.sock ")
    assert Settings().redis_urls == ["redis://10.0.0.1:6379/0", "redis://10.0.0.2:6380/1", "unix:///tmp/r.sock"]


def test_single_redis_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_REDIS_URLS", "rediss://cache.example:6380/0")
    assert Settings().redis_urls == ["rediss://cache.example:6380/0"]


def test_redis_urls_as_list_keyword() -> None:
    assert Settings(redis_urls=["redis://a:1/0", "redis://b:2/0"]).redis_urls == ["redis://a:1/0", "redis://b:2/0"]


@pytest.mark.parametrize("value", ["http://127.0.0.1:6379", "redis://ok:1/0,127.0.0.1:6379", "localhost"])
def test_bad_redis_url_is_rejected(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TESSERA_REDIS_URLS", value)
    with pytest.raises(ValidationError, match="not a Redis URL"):
        Settings()


@pytest.mark.parametrize("value", ["", " , ,"])
def test_empty_redis_urls_are_rejected(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TESSERA_REDIS_URLS", value)
    with pytest.raises(ValidationError, match="at least one Redis URL"):
        Settings()


def test_env_overrides_and_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_GRPC_PORT", "50099")
    monkeypatch.setenv("TESSERA_NODE_TIMEOUT_S", "2.5")
    monkeypatch.setenv("TESSERA_NATS_URL", "nats://n:4223")
    s = Settings()
    assert (s.grpc_port, s.node_timeout_s, s.nats_url) == (50099, 2.5, "nats://n:4223")


@pytest.mark.parametrize(("var", "value"), [("TESSERA_GRPC_PORT", "70000"), ("TESSERA_RPC_TIMEOUT_S", "0"),
                                            ("TESSERA_INSTANCE_TTL_S", "-1"), ("TESSERA_REDIS_SHARDS", "0")])
def test_out_of_range_values_are_rejected(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError):
        Settings()


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.grpc_port = 1  # type: ignore[misc]


def test_resolved_instance_id() -> None:
    assert Settings(instance_id="cs-1").resolved_instance_id == "cs-1"
    assert Settings().resolved_instance_id == f"{os.uname().nodename}-{os.getpid()}"


def test_otel_service_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert otel_service_name("compiler") == "compiler"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "custom")
    assert otel_service_name("compiler") == "custom"
