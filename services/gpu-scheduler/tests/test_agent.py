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
