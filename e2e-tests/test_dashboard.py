"""The dashboard in a real browser: Debian's chromium driven by Playwright (its own browser download is not
reachable here, so ``executable_path`` points at the system's).

A stack with a virtual GPU runs a workload (tasks, a failing task, an actor, a put, a serving pipeline, a GPU
job); every page is opened and what it shows is checked against the control store (read with the state API).
A task submitted while a page is open appears without a reload (server-sent events). With the control store
stopped every page shows the banner, no traceback, and the banner goes by itself when the store answers again,
also after a kill -9 and the supervisor's restart. Each page's screenshot goes to docs/screenshots/.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stacks

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.timeout(600)]

CHROMIUM = os.environ.get("TESSERA_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
JAEGER = "http://jaeger.example:16686"
GPU_ENTRY = "tessera.gpu_scheduler.examples:train"

sync_api = pytest.importorskip("playwright.sync_api")
if not os.access(CHROMIUM, os.X_OK) and not os.environ.get("CI"):
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stacks.Cluster]:
    with stacks.running(tmp_path_factory, "dash", "--gpus-per-node", "1", timeout=150, TESSERA_DASHBOARD_PORT="0",
                        JAEGER_UI_URL=JAEGER, TESSERA_OBJECT_STORE_MEMORY=str(128 * 2**20),
                        TESSERA_OBJECT_STORE_PREFAULT="false", TESSERA_GPU_SCHEDULER_QUANTUM_S="2",
                        OTEL_TRACES_SAMPLER="always_on") as c:
        yield c


@pytest.fixture(scope="module")
def url(stack: stacks.Cluster) -> str:
    status = stack.status()
    assert status["dashboard_url"].startswith("http://127.0.0.1:")
    up = stack.cli("status")
    assert f"Dashboard: {status['dashboard_url']}" in up.stdout
    return str(status["dashboard_url"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):  # CI installs it (.ci/run) before these run: its absence is a failure there
        raise RuntimeError(f"no chromium at {CHROMIUM} (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def workload(stack: stacks.Cluster) -> Iterator[dict[str, Any]]:
    """Tasks (one failing), an actor, a put, a serving pipeline with requests and a finished GPU job; the driver
    stays connected (its objects stay referenced) while the pages are checked."""
    import numpy as np
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import tessera
    from tessera.gpu import GpuClient
    from tessera.serving import Client as ServingClient

    @tessera.remote
    def square(x: int) -> int:
        return x * x

    @tessera.remote(max_retries=0)
    def boom() -> None:
        raise ValueError("dashboard-boom")

    @tessera.remote
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def incr(self) -> int:
            self.n += 1
            return self.n

    address = stack.info()["control_store_address"]
    with stack.driving("dashboard-workload"):
        # the results stay referenced: a task's record lives as long as its results (and a few seconds more)
        squares = [square.remote(i) for i in range(5)]
        assert tessera.get(squares, timeout=120) == [i * i for i in range(5)]
        failing = boom.remote()
        with pytest.raises(Exception, match="dashboard-boom"):
            tessera.get(failing, timeout=120)
        counter = Counter.options(name="dash-counter").remote()  # type: ignore[attr-defined]
        counts = [counter.incr.remote() for _ in range(3)]
        assert tessera.get(counts, timeout=120)[-1] == 3
        blob = tessera.put(np.zeros(2**20, dtype=np.uint8))

        rng = np.random.default_rng(0)
        X = rng.normal(size=(60, 3))
        model = make_pipeline(StandardScaler(), Ridge(alpha=0.1)).fit(X, X @ [1.0, -2.0, 0.5])
        with ServingClient(cluster_address=address) as serving:
            serving.register("dash-ridge", model)
            for i in range(20):
                serving.predict("dash-ridge", X[i:i + 2].tolist())

        with GpuClient(cluster_address=address) as gpu:
            job = gpu.submit(entry_point=GPU_ENTRY, args=["20", "0"], name="dash-train")
            stacks.poll_until(lambda: next(j for j in gpu.list() if j.job_id == job).finished_at or None,
                              timeout=180, interval=0.5, what="the GPU job to finish")
        yield {"address": address, "blob": blob, "counter": counter, "square": square, "job": job,
               "refs": [squares, failing, counts]}


def _state(address: str, resource: str) -> list[dict[str, Any]]:
    from tessera import _state

    return _state.list_state(resource, address=address, limit=_state.MAX_LIMIT)[0]


def _open(browser: Any, url: str, page: str) -> Any:
    tab = browser.new_page(viewport={"width": 1280, "height": 860})
    tab.goto(f"{url}/{page}")
    tab.wait_for_selector("main#main")
    return tab


def _shot(tab: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(SHOTS / f"{name}.png"))


def _stat(tab: Any, test_id: str) -> str:
    return str(tab.get_by_test_id(test_id).inner_text()).strip()


def test_cluster_page(browser: Any, url: str, workload: dict[str, Any], stack: stacks.Cluster) -> None:
    from tessera.client import Client

    tab = _open(browser, url, "cluster")
    nodes = _state(workload["address"], "nodes")
    assert _stat(tab, "alive-nodes") == str(sum(n["state"] == "ALIVE" for n in nodes))
    table = tab.get_by_test_id("nodes").inner_text()
    for n in nodes:
        assert n["node_id"][:12] in table
    with Client(workload["address"]) as c:
        instances = c.instances()
    services = tab.get_by_test_id("services").inner_text()
    for i in instances:
        assert i.address in services
    for name in {i.service for i in instances}:
        assert _stat(tab, f"replicas-{name}") == str(sum(i.service == name for i in instances))
    assert "UNREACHABLE" not in services and "Traceback" not in tab.content()
    assert tab.locator("a", has_text="metrics").count() >= len(instances)
    _shot(tab, "cluster")
    tab.close()


def test_tasks_page_and_live_update(browser: Any, url: str, workload: dict[str, Any]) -> None:
    import tessera

    tab = _open(browser, url, "tasks")
    tasks = _state(workload["address"], "tasks")
    actors = _state(workload["address"], "actors")
    assert int(_stat(tab, "tasks-total")) >= len([t for t in tasks if t["name"] != "late_arrival"])
    shown = tab.get_by_test_id("tasks").inner_text()
    for t in tasks[:20]:
        assert t["task_id"][:16] in shown
    failed = [t for t in tasks if t["state"] == "FAILED"]
    assert failed and _stat(tab, "tasks-failed") == str(len(failed))
    failure = tab.locator(f'details.failure[data-task-id="{failed[0]["task_id"]}"]')
    failure.locator("summary").click()
    assert "ValueError: dashboard-boom" in failure.inner_text()  # the error text, traceback included
    assert "Traceback" in failure.locator("pre").inner_text()
    assert "square" in tab.get_by_test_id("by-function").inner_text()
    counter = next(a for a in actors if a["name"] == "dash-counter")
    assert counter["actor_id"][:16] in tab.get_by_test_id("actors").inner_text()
    assert "Counter" in tab.get_by_test_id("by-class").inner_text()
    assert tab.locator("#chart-throughput .uplot").count() == 1  # the vendored chart library drew
    _shot(tab, "tasks")

    # a task submitted now appears without a reload: pushed as a server-sent event
    tab.evaluate("window.notReloaded = true")
    before = tab.evaluate("window.tesseraDashboard.events")

    @tessera.remote
    def late_arrival() -> int:
        return 7

    late = late_arrival.remote()  # the driver is still connected (the workload fixture)
    assert tessera.get(late, timeout=120) == 7
    tab.wait_for_function("document.querySelector('[data-testid=by-function]').innerText.includes('late_arrival')",
                          timeout=20_000)
    assert tab.evaluate("window.notReloaded") is True
    assert tab.evaluate("window.tesseraDashboard.events") > before
    tab.close()


def test_objects_page(browser: Any, url: str, workload: dict[str, Any]) -> None:
    tab = _open(browser, url, "objects")
    rows = _state(workload["address"], "objects")
    blob = workload["blob"].hex()
    assert blob in {r["object_id"] for r in rows}
    assert _stat(tab, "objects-total") == str(len({r["object_id"] for r in rows}))
    assert tab.locator(f'[data-testid=objects] code[title="{blob}"]').count() >= 1
    owner = next(r["process"] for r in rows if r["object_id"] == blob and r["owned"])
    assert owner in tab.get_by_test_id("by-owner").inner_text()
    assert "1.0 MiB" in tab.get_by_test_id("by-owner").inner_text()
    nodes = tab.get_by_test_id("by-node").inner_text()
    for node in next(r["nodes"] for r in rows if r["object_id"] == blob):
        assert node[:12] in nodes
    _shot(tab, "objects")
    tab.close()


def test_gpu_page(browser: Any, url: str, workload: dict[str, Any]) -> None:
    from tessera.gpu import GpuClient

    tab = _open(browser, url, "gpu")
    with GpuClient(cluster_address=workload["address"]) as gpu:
        jobs = gpu.list()
    assert _stat(tab, "gpu-jobs-total") == str(len(jobs))
    row = tab.get_by_test_id("gpu-jobs").locator("tr", has_text=workload["job"])
    assert "SUCCEEDED" in row.inner_text() and "dash-train" in row.inner_text()
    assert tab.locator(f'.lane[data-job-id="{workload["job"]}"]').count() == 1
    (info,) = [j for j in jobs if j.job_id == workload["job"]]
    slices = tab.locator(f'.lane[data-job-id="{workload["job"]}"] .slice')  # its time slices, from its record
    assert slices.count() == len(info.history) >= 1
    assert slices.last.get_attribute("data-ended-by") == info.history[-1].ended_by == "succeeded"
    assert _stat(tab, "gpu-mean-jct") != "-"
    _shot(tab, "gpu")
    tab.close()


def test_serving_page(browser: Any, url: str, workload: dict[str, Any]) -> None:
    tab = _open(browser, url, "serving")
    pipelines = _state(workload["address"], "pipelines")
    assert _stat(tab, "pipelines-total") == str(len(pipelines))
    row = tab.get_by_test_id("pipelines").locator("tr", has_text="dash-ridge").inner_text()
    cells = row.split("\t")
    assert int(cells[3]) >= 20  # requests, from the replicas' /metrics
    assert re.fullmatch(r"\d+\.\d{3}", cells[4]) and re.fullmatch(r"\d+\.\d{3}", cells[5])  # p50, p99 in ms
    assert float(cells[4]) <= float(cells[5])
    from tessera.serving import Client as ServingClient

    with ServingClient(cluster_address=workload["address"]) as serving:
        stats = serving.stats()
    replica = tab.get_by_test_id("serving-replicas").locator("tr", has_text=stats.http_address).inner_text()
    cells = replica.split("\t")
    assert cells[3] == str(stats.pipelines) and cells[4].startswith(f"{stats.param_arrays} (")  # shared, kept once
    assert cells[7] == str(stats.rows_computed)
    _shot(tab, "serving")
    tab.close()


def test_unknown_page_is_404(browser: Any, url: str) -> None:
    tab = browser.new_page()
    resp = tab.goto(f"{url}/nope")
    assert resp.status == 404 and "cluster" in tab.inner_text("body")
    tab.close()


def test_banner_while_the_control_store_is_down(browser: Any, url: str, workload: dict[str, Any],
                                               stack: stacks.Cluster) -> None:
    tab = _open(browser, url, "cluster")
    pid = stack.pid("control-store")
    os.kill(pid, signal.SIGSTOP)  # it answers nothing, as a hung or unreachable store
    try:
        for page in ("cluster", "tasks", "gpu", "serving"):
            other = _open(browser, url, page)
            assert other.get_by_test_id("store-down").is_visible()
            assert "Traceback" not in other.content() and "Control store unavailable" in other.inner_text("main")
            if page == "cluster":
                _shot(other, "store-down")
            other.close()
        tab.goto(f"{url}/cluster")
        assert tab.get_by_test_id("store-down").is_visible()
        tab.evaluate("window.notReloaded = true")
    finally:
        os.kill(pid, signal.SIGCONT)
    # back without a reload: the page asks again every 2 s while the banner shows
    tab.wait_for_selector("[data-testid=nodes]", timeout=30_000)
    assert tab.get_by_test_id("store-down").count() == 0 and tab.evaluate("window.notReloaded") is True

    # killed and restarted by the supervisor: the dashboard reads the new one with nothing to rebuild
    old = stack.kill("control-store")
    stack.wait_restarted("control-store", old, timeout=90)
    deadline = time.monotonic() + 60
    while True:
        tab.goto(f"{url}/cluster")
        if tab.get_by_test_id("nodes").count() == 1:
            break
        assert time.monotonic() < deadline, tab.inner_text("main")
        time.sleep(1)
    assert "Traceback" not in tab.content()
    tab.close()
