"""The launcher against infrastructure it does not own, and with several Redis shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import stacks

import tessera
from tessera.common.config import SERVICES

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BIN = Path(sys.executable).parent


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(BIN / "tessera"), *args], env=env, capture_output=True, text=True, timeout=150)
    if args[:1] == ("up",):  # the session's leak check fails the run if `down` leaves any of them behind
        stacks.Cluster(Path(env["TESSERA_RUN_DIR"]), env).track()
    return out


@pytest.mark.long
def test_up_uses_given_nats_and_starts_two_redis_shards(tmp_path: Path, nats_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
    env.update(TESSERA_RUN_DIR=str(tmp_path), TESSERA_NATS_URL=nats_url)
    up = _cli(env, "up", "--redis-shards", "2")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        status = json.loads(_cli(env, "status", "--json").stdout)
        names = [p["name"] for p in status["processes"]]
        assert "nats" not in names  # the given NATS is used, not a new one
        assert names[:2] == ["redis-0", "redis-1"] and len(status["redis_urls"]) == 2
        assert status["nats_url"] == nats_url
        assert all(p["health"] == "SERVING" for p in status["processes"] if p["kind"] == "service")
        # neither the standard NATS nor Redis port is taken by the launcher
        assert all(not p["address"].endswith((":4222", ":6379")) for p in status["processes"])
        with tessera.connect(status["control_store_address"]) as c:
            for i in range(20):  # keys spread over both shards
                c.kv_put("shards", f"k{i}".encode(), b"v")
            assert len(c.kv_list("shards")) == 20
            assert {i.service for i in c.instances()} == set(SERVICES)
        per_shard = [redis.Redis.from_url(u).zcard(b"kv-index:shards") for u in status["redis_urls"]]
        assert sum(per_shard) == 20 and all(n > 0 for n in per_shard), per_shard
        again = _cli(env, "up")
        assert again.returncode == 0 and "already up" in again.stdout
    finally:
        down = _cli(env, "down")
    assert down.returncode == 0 and "Tessera is down" in down.stdout
    assert _cli(env, "status").returncode == 2


def test_logs_of_unknown_process_is_a_clear_error(tmp_path: Path) -> None:
    env = dict(os.environ, TESSERA_RUN_DIR=str(tmp_path))
    out = _cli(env, "logs", "no-such-service")
    assert out.returncode == 1 and "no log for 'no-such-service'" in out.stderr


def test_status_and_down_when_nothing_runs(tmp_path: Path) -> None:
    env = dict(os.environ, TESSERA_RUN_DIR=str(tmp_path))
    assert _cli(env, "status").returncode == 2
    down = _cli(env, "down")
    assert down.returncode == 0 and "not running" in down.stdout


@pytest.mark.parametrize("args,message", [
    (["--nodes", "0"], "--nodes must be between 1 and 16"),
    (["--nodes", "17"], "--nodes must be between 1 and 16"),
    (["--redis-shards", "65"], "--redis-shards must be between 1 and 64"),
    (["--services", "object-store,task-scheduler"], "--services: the services must include control-store"),
    (["--services", "control-store,ray"], "--services: unknown service 'ray'"),
])
def test_up_rejects_bad_arguments_and_starts_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    env = dict(os.environ, TESSERA_RUN_DIR=str(tmp_path))
    out = _cli(env, "up", *args)
    assert out.returncode == 2 and message in out.stderr
    assert not (tmp_path / "cluster.json").exists()


def test_up_with_a_subset_of_services_runs_tasks(tmp_path: Path) -> None:
    """``--services`` starts only the services named (here those of tasks and actors); tasks run on them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
    env.update(TESSERA_RUN_DIR=str(tmp_path), TESSERA_NUM_CPUS="1")
    up = _cli(env, "up", "--services", "task-scheduler,control-store,object-store")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        status = json.loads(_cli(env, "status", "--json").stdout)
        services = [p["name"] for p in status["processes"] if p["kind"] == "service"]
        assert services == ["control-store", "object-store", "task-scheduler"]  # in the usual order, nothing else
        assert status["healthy"]
        code = ("import tessera\ntessera.init(name='subset')\n@tessera.remote\ndef inc(x):\n    return x + 1\n"
                "print(tessera.get(inc.remote(41)))\ntessera.shutdown()")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.split() == ["42"], out.stdout + out.stderr
        with tessera.connect(status["control_store_address"]) as c:
            assert {i.service for i in c.instances()} == {"control-store", "object-store", "task-scheduler"}
    finally:
        down = _cli(env, "down")
    assert down.returncode == 0 and "Tessera is down" in down.stdout
