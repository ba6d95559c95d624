"""The node agent's GPU discovery (NVML optional) and its job executors."""

from __future__ import annotations

import subprocess
import sys
import types
from typing import Any

import pytest

from tessera.gpu_scheduler.agent import discover_gpus


def test_without_nvml_bindings_the_agent_offers_virtual_slots() -> None:
    # in a fresh interpreter where `import pynvml` fails, whether or not nvidia-ml-py is installed here
    code = ("import sys; sys.modules['pynvml'] = None\n"
            "from tessera.gpu_scheduler.agent import discover_gpus\n"
            "g = discover_gpus(3); print(g.count, g.kind, ','.join(g.names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == ["3", "virtual", "virtual-0,virtual-1,virtual-2"]


class _NvmlError(Exception):
    pass


def _fake_nvml(names: list[Any], *, init_error: bool = False) -> types.ModuleType:
    """The calls of nvidia-ml-py the agent makes, over a made-up set of devices."""
    m = types.ModuleType("pynvml")
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error:
            raise _NvmlError("Driver Not Loaded")

    m.nvmlInit = init  # type: ignore[attr-defined]
    m.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    m.nvmlDeviceGetCount = lambda: len(names)  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = lambda h: names[h]  # type: ignore[attr-defined]
    m.calls = calls  # type: ignore[attr-defined]
    return m


def test_nvml_devices_are_reported_and_the_library_shut_down(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_nvml(["NVIDIA H100 80GB HBM3", b"NVIDIA A100-SXM4-40GB"])  # str (new bindings) and bytes (old)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    g = discover_gpus(4)
    assert (g.count, g.kind, g.names) == (2, "nvml", ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"])
    assert fake.calls == ["init", "shutdown"]  # type: ignore[attr-defined]


def test_nvml_without_driver_or_devices_falls_back_to_virtual_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(["x"], init_error=True))
    assert (discover_gpus(2).kind, discover_gpus(2).count) == ("virtual", 2)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([]))
    assert (discover_gpus(1).kind, discover_gpus(1).count) == ("virtual", 1)


def test_the_real_nvml_library_where_installed() -> None:
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed (optional: pip install nvidia-ml-py)")
    g = discover_gpus(2)
    try:
        pynvml.nvmlInit()
    except Exception:  # installed, but no driver here: virtual slots
        assert (g.kind, g.count) == ("virtual", 2)
        return
    try:
        n = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    assert (g.kind, g.count) == (("nvml", n) if n else ("virtual", 2))


def test_docker_unavailable_gives_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from tessera.gpu_scheduler.executors import docker_unavailable

    monkeypatch.setitem(sys.modules, "docker", None)
    assert docker_unavailable() == "container jobs need the docker SDK (pip install docker) and a Docker engine"
    fake = types.ModuleType("docker")

    class NoEngine:
        def ping(self) -> None:
            raise ConnectionError("Cannot connect to the Docker daemon at unix:///var/run/docker.sock")

        def close(self) -> None:
            pass

    fake.from_env = lambda timeout: NoEngine()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "docker", fake)
    assert docker_unavailable() == "no Docker engine reachable: Cannot connect to the Docker daemon at unix:///var/run/docker.sock"


async def test_docker_executor_runs_the_image_with_the_job_channel(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """What the Docker executor asks of the engine, and the job channel it sets up (engine stood in for)."""
    import asyncio
    import json
    import os
    import threading

    from tessera.gpu_scheduler.executors import DockerExecutor

    types_mod = types.ModuleType("docker.types")

    class DeviceRequest:
        def __init__(self, *, device_ids: list[str], capabilities: list[list[str]]) -> None:
            self.device_ids, self.capabilities = device_ids, capabilities

    types_mod.DeviceRequest = DeviceRequest  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "docker.types", types_mod)
    done = threading.Event()
    runs: list[tuple[Any, ...]] = []

    class Container:
        id = "c0ffee" * 4

        def __init__(self, env: dict[str, str]) -> None:
            self.env = env

        def logs(self, **kw: Any) -> Any:
            yield b"hello from the container\n"

        def wait(self) -> dict[str, int]:
            # the "job": reads one instruction from its pipe, reports it back, exits 0
            with open(self.env["TESSERA_GPU_CTL_PATH"]) as ctl:
                word = ctl.readline().strip()
            fd = os.open(self.env["TESSERA_GPU_REPORT_PATH"], os.O_WRONLY)
            os.write(fd, (json.dumps({"event": "progress", "echo": word}) + "\n").encode())
            os.close(fd)
            done.wait(10)
            return {"StatusCode": 0}

        def remove(self, force: bool) -> None:
            pass

    class Containers:
        def run(self, image: str, command: Any, **kw: Any) -> Container:
            runs.append((image, command, kw))
            return Container(kw["environment"])

    class Client:
        containers = Containers()

        def close(self) -> None:
            pass

    ex = DockerExecutor(Client())
    env = {"TESSERA_GPU_JOB_ID": "j1", "TESSERA_ADDRESS": "127.0.0.1:7000", "HOME": "/root", "PATH": "/usr/bin",
           "TRACEPARENT": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    run = await ex.launch("j1", "img:1", ["python", "train.py"], env, slots=[2, 3], real_gpus=True, work_dir=tmp_path,
                          mounts=[tmp_path / "ckpt"], log_path=tmp_path / "logs" / "j1.log")
    image, command, kw = runs[0]
    assert (image, command, kw["network_mode"]) == ("img:1", ["python", "train.py"], "host")
    assert [(r.device_ids, r.capabilities) for r in kw["device_requests"]] == [(["2", "3"], [["gpu"]])]
    cenv = kw["environment"]
    assert "HOME" not in cenv and "PATH" not in cenv  # the host's own environment stays on the host
    assert cenv["TESSERA_GPU_JOB_ID"] == "j1" and cenv["TESSERA_ADDRESS"] == "127.0.0.1:7000" and "TRACEPARENT" in cenv
    assert {str(tmp_path / "ckpt"), cenv["TESSERA_GPU_CTL_PATH"].rsplit("/", 1)[0]} <= set(kw["volumes"])
    run.send("suspend")
    waiter = asyncio.create_task(run.wait())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(run.report_fd, "rb", 0))
    line = await asyncio.wait_for(reader.readline(), 10)
    assert json.loads(line) == {"event": "progress", "echo": "suspend"}
    done.set()
    assert await asyncio.wait_for(waiter, 10) == 0 and run.returncode == 0
    assert await asyncio.wait_for(reader.readline(), 10) == b""  # the report pipe ends with the container
    transport.close()
    assert not (tmp_path / "jobs" / "j1").exists()
    assert (tmp_path / "logs" / "j1.log").read_bytes() == b"hello from the container\n"


async def test_a_job_started_to_await_its_checkpoint_waits_until_handed_one(tmp_path: Any) -> None:
    """The target of a migration, through a real agent and job process: it waits (no progress) until restore."""
    import asyncio

    pytest.importorskip("torch")
    from tessera.common.errors import FailedPreconditionError, NotFoundError
    from tessera.gpu_scheduler.agent import GpuInfo, NodeAgent

    agent = NodeAgent("n" * 32, GpuInfo(1, "virtual", ["virtual-0"]), work_dir=tmp_path / "w")
    out = tmp_path / "out.pt"
    try:
        await agent.start("j1", {"entry_point": "tessera.gpu_scheduler.examples:train", "args": ["20", "1", str(out)]},
                          [0], "", await_checkpoint=True)
        assert agent.snapshot()["jobs"]["j1"]["state"] == "waiting"
        with pytest.raises(NotFoundError):
            agent.restore("nope", "")
        await asyncio.sleep(8.0)  # time enough to import, build and train 20 tiny steps, were it not waiting
        assert agent.snapshot()["jobs"]["j1"]["step"] == 0 and not out.exists()
        agent.changed.clear()
        agent.restore("j1", "")  # no checkpoint: it starts from scratch
        with pytest.raises(FailedPreconditionError):
            agent.restore("j1", "")  # handed once
        await asyncio.wait_for(agent.changed.wait(), 120)  # its exit is reported at once
        view = agent.snapshot()["jobs"]["j1"]
        assert (view["state"], view["rc"], view["step"]) == ("exited", 0, 20) and out.exists()
    finally:
        await agent.close()
