"""runtime_env (Ray's ``env_vars``, ``working_dir``, ``py_modules``) and ``tessera.init()`` starting a local
cluster, on clusters brought up by `tessera up` (modelled on the behaviour Ray's test_runtime_env checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import stacks

import tessera
from tessera import _runtime_env
from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.common import packages
from tessera.common.names import RUNTIME_RESOURCES_DIR
from tessera.exceptions import RuntimeEnvSetupError

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_ENV = {"env_vars": {"JOB_VAR": "job", "SHARED": "from-job"}}


@pytest.fixture(scope="module")
def local_drivers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[subprocess.Popen[str], Path]]]:
    """Two drivers with no cluster to find, started first so that the local clusters they start come up while
    the other tests run: one calls shutdown, the other just exits. Left only once they have ended (each stops
    its own cluster)."""
    root = tmp_path_factory.mktemp("local-drivers")
    drivers = {"shutdown": (_driver(root / "a", START + "tessera.shutdown()\nprint('after', tessera.is_initialized())\n"),
                            root / "a"),
               "exit": (_driver(root / "b", START), root / "b")}
    try:
        yield drivers
    finally:
        for p, _ in drivers.values():
            if p.poll() is None:
                p.communicate(timeout=240)


@pytest.fixture(scope="module")
def cluster(local_drivers: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[stacks.Cluster]:
    with stacks.running(tmp_path_factory, "runtime-env", "--nodes", "2",
                        "--services", "control-store,object-store,task-scheduler", TESSERA_NUM_CPUS="2",
                        TESSERA_OBJECT_STORE_MEMORY=str(64 * 2**20)) as c:
        patch = c.point_here()
        tessera.init(name="e2e-runtime-env", runtime_env=JOB_ENV)
        try:
            yield c
        finally:
            tessera.shutdown()
            patch.undo()


@pytest.fixture(scope="module")
def code(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A working_dir, a package, a single module and a zipped package, none of them importable here."""
    root = tmp_path_factory.mktemp("code")
    wd = root / "wd"
    wd.mkdir()
    tag = uuid.uuid4().hex  # a package no earlier run stored
    (wd / "wd_helper.py").write_text(f"TAG = {tag!r}\n\ndef value():\n    return 42\n")
    (wd / "data.txt").write_text("from the working_dir\n")
    pkg = root / "mods" / "re_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("NAME = 're_pkg'\n")
    single = root / "mods" / "re_single.py"
    single.write_text("NAME = 're_single'\n")
    zipped = root / "re_zipped.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("re_zipped/__init__.py", "NAME = 're_zipped'\n")
    return {"wd": wd, "pkg": pkg, "single": single, "zip": zipped, "tag": Path(tag)}


@tessera.remote
def env_of(*names: str) -> dict[str, Any]:
    return {"pid": os.getpid(), **{n: os.environ.get(n) for n in names}}


@tessera.remote
def in_working_dir() -> tuple[int, str, str, str]:
    import wd_helper  # only in the working_dir

    with open("data.txt") as f:
        return wd_helper.value(), wd_helper.TAG, os.getcwd(), f.read().strip()


@tessera.remote
def call_in_a_task(f: Any) -> Any:
    return tessera.get(f.remote(), timeout=60)


@tessera.remote
def module_names() -> list[str]:
    import re_pkg
    import re_single
    import re_zipped

    return [re_pkg.NAME, re_single.NAME, re_zipped.NAME]


@tessera.remote
def context_env() -> dict[str, Any]:
    return tessera.get_runtime_context().runtime_env


@tessera.remote
class Holder:
    def env(self, name: str) -> str | None:
        return os.environ.get(name)

    def cwd_listing(self) -> list[str]:
        return sorted(os.listdir("."))


# ---------------------------------------------------------------------- env_vars


def test_env_vars_of_the_job_and_the_task_merge_as_in_ray(cluster: stacks.Cluster) -> None:
    plain = tessera.get(env_of.remote("JOB_VAR", "SHARED", "TASK_VAR"), timeout=60)
    assert (plain["JOB_VAR"], plain["SHARED"], plain["TASK_VAR"]) == ("job", "from-job", None)
    own = env_of.options(runtime_env={"env_vars": {"TASK_VAR": "t", "SHARED": "from-task"}})
    got = tessera.get(own.remote("JOB_VAR", "SHARED", "TASK_VAR"), timeout=60)
    assert (got["JOB_VAR"], got["SHARED"], got["TASK_VAR"]) == ("job", "from-task", "t")  # the task's win
    assert tessera.get_runtime_context().runtime_env == JOB_ENV
    inner = tessera.get(context_env.options(runtime_env={"env_vars": {"TASK_VAR": "t"}}).remote(), timeout=60)
    assert inner == {"env_vars": {"JOB_VAR": "job", "SHARED": "from-job", "TASK_VAR": "t"}}


def test_env_vars_do_not_leak_into_later_tasks(cluster: stacks.Cluster) -> None:
    marked = env_of.options(runtime_env={"env_vars": {"LEAKY": "1"}})
    with_var = tessera.get([marked.remote("LEAKY") for _ in range(4)], timeout=60)
    assert {r["LEAKY"] for r in with_var} == {"1"}
    later = tessera.get([env_of.remote("LEAKY") for _ in range(12)], timeout=60)
    assert {r["LEAKY"] for r in later} == {None}
    assert not {r["pid"] for r in with_var} & {r["pid"] for r in later}  # never the same worker process


def test_env_vars_read_when_the_interpreter_starts_take_effect(cluster: stacks.Cluster, code: dict[str, Path]) -> None:
    f = module_names.options(runtime_env={"env_vars": {"PYTHONPATH": str(code["pkg"].parent)},
                                          "py_modules": [str(code["zip"])]})
    # PYTHONPATH (read when the interpreter starts) makes re_pkg and re_single, which sit side by side, importable
    assert tessera.get(f.remote(), timeout=60) == ["re_pkg", "re_single", "re_zipped"]


def test_an_actor_runs_with_its_runtime_env(cluster: stacks.Cluster) -> None:
    a = Holder.options(runtime_env={"env_vars": {"ACTOR_VAR": "a"}}).remote()
    assert tessera.get([a.env.remote("ACTOR_VAR"), a.env.remote("JOB_VAR")], timeout=60) == ["a", "job"]
    b = Holder.remote()
    assert tessera.get(b.env.remote("ACTOR_VAR"), timeout=60) is None
    tessera.kill(a)
    tessera.kill(b)


# ---------------------------------------------------------------------- working_dir and py_modules


def _package_keys(cluster: stacks.Cluster) -> set[bytes]:
    cs = tessera._api.control_store()
    return set(cs.KvList(cpb.KvListRequest(namespace=packages.NAMESPACE), timeout=10.0).keys)


def test_working_dir_is_the_cwd_and_importable_and_stored_once(cluster: stacks.Cluster,
                                                               code: dict[str, Path]) -> None:
    before, uploads = _package_keys(cluster), _runtime_env.uploads
    f = in_working_dir.options(runtime_env={"working_dir": str(code["wd"])})
    value, tag, cwd, data = tessera.get(f.remote(), timeout=60)
    assert (value, tag, data) == (42, str(code["tag"]), "from the working_dir")
    assert cwd != str(code["wd"]) and Path(cwd).parent.parent.name == RUNTIME_RESOURCES_DIR  # the node's copy
    # the same folder again, from another .options() and an actor: packed again, stored no more
    again = in_working_dir.options(runtime_env={"working_dir": str(code["wd"]), "env_vars": {"X": "1"}})
    assert tessera.get([again.remote() for _ in range(3)], timeout=60)[0][:2] == (42, str(code["tag"]))
    h = Holder.options(runtime_env={"working_dir": str(code["wd"])}).remote()
    assert "wd_helper.py" in tessera.get(h.cwd_listing.remote(), timeout=60)
    tessera.kill(h)
    # a copy sent to a task names the package, not a path of this machine, and runs there as here
    shipped = cloudpickle.loads(cloudpickle.dumps(f))
    assert shipped._options["runtime_env"]["working_dir"].startswith(packages.SCHEME)
    assert tessera.get(call_in_a_task.remote(f), timeout=60)[:2] == (42, str(code["tag"]))
    new = _package_keys(cluster) - before
    assert len(new) == 1 and _runtime_env.uploads == uploads + 1
    (key,) = new
    cached = list((cluster.run_dir / RUNTIME_RESOURCES_DIR).glob(f"*/{key.decode()}/.complete"))
    assert 1 <= len(cached) <= 2  # unpacked once per node that ran it


def test_py_modules_folders_files_and_zips_are_importable(cluster: stacks.Cluster, code: dict[str, Path]) -> None:
    f = module_names.options(runtime_env={"py_modules": [str(code["pkg"]), str(code["single"]), str(code["zip"])]})
    assert tessera.get(f.remote(), timeout=60) == ["re_pkg", "re_single", "re_zipped"]
    with pytest.raises(tessera.exceptions.TaskError, match="No module named 're_pkg'"):
        tessera.get(module_names.remote(), timeout=60)  # not for tasks without them


def test_a_package_the_cluster_lacks_fails_its_tasks_with_runtime_env_setup_error(cluster: stacks.Cluster) -> None:
    missing = "pkg:" + "0" * 64
    with pytest.raises(RuntimeEnvSetupError, match="could not be read"):
        tessera.get(env_of.options(runtime_env={"working_dir": missing}).remote(), timeout=60)
    assert tessera.get(env_of.remote("JOB_VAR"), timeout=60)["JOB_VAR"] == "job"  # the node serves on


# ---------------------------------------------------------------------- bad input


def test_unsupported_and_unknown_keys_are_refused(cluster: stacks.Cluster, tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError, match=r"runtime_env\['pip'\] is not supported yet"):
        env_of.options(runtime_env={"pip": ["requests"]})
    with pytest.raises(NotImplementedError, match="conda"):
        tessera.remote(runtime_env={"conda": "env"})(Holder._cls)
    with pytest.raises(ValueError, match="unknown runtime_env key 'bogus'; supported keys: env_vars, py_modules"):
        env_of.options(runtime_env={"bogus": 1})
    with pytest.raises(ValueError, match="unknown runtime_env key 'bogus'"):
        tessera.init(runtime_env={"bogus": 1})
    with pytest.raises(TypeError, match="env_vars'\\] must be a dict of str to str"):
        env_of.options(runtime_env={"env_vars": {"N": 1}})
    with pytest.raises(ValueError, match="does not exist"):
        env_of.options(runtime_env={"working_dir": str(tmp_path / "nowhere")})
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="must be a folder or a .zip"):
        env_of.options(runtime_env={"working_dir": str(tmp_path / "notes.txt")})
    with pytest.raises(TypeError, match="must be a dict"):
        env_of.options(runtime_env=["env_vars"])


# ---------------------------------------------------------------------- starting a local cluster


def _env(tmp_path: Path) -> dict[str, str]:
    """A driver's environment with no cluster to find: an empty run directory, no TESSERA_ADDRESS, and a temp
    directory of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
    (tmp_path / "tmp").mkdir(parents=True, exist_ok=True)
    env.update(TESSERA_RUN_DIR=str(tmp_path / "run"), TMPDIR=str(tmp_path / "tmp"), TESSERA_NUM_CPUS="1",
               OTEL_TRACES_EXPORTER="none")
    return env


def _driver(tmp_path: Path, code: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=_env(tmp_path), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finished(p: subprocess.Popen[str], timeout: float = 240) -> list[str]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, out + err
    return out.splitlines()


START = textwrap.dedent("""
    import json, os, sys, tessera
    from tessera import _api
    tessera.init()
    st = _api.state()
    info = json.load(open(os.path.join(st.started, "cluster.json")))
    pids = [info["supervisor_pid"], *(p["pid"] for p in info["procs"] if p["pid"])]
    @tessera.remote
    def add(a, b):
        return a + b
    print(json.dumps({"run_dir": st.started, "pids": pids, "sum": tessera.get(add.remote(1, 2), timeout=60)}))
    sys.stdout.flush()
""")


def _gone(pid: int) -> bool:
    return not stacks.alive(pid)


def test_init_with_no_cluster_starts_one_that_shutdown_or_exit_stops(local_drivers: Any) -> None:
    for how, (p, d) in local_drivers.items():
        lines = _finished(p)
        out = json.loads(lines[0])
        assert out["sum"] == 3 and len(out["pids"]) > 3
        assert Path(out["run_dir"]).parent == d / "tmp"  # a run directory of its own, not TESSERA_RUN_DIR's
        if how == "shutdown":
            assert lines[1] == "after False"
        stacks.poll_until(lambda: all(_gone(pid) for pid in out["pids"]), timeout=30,  # noqa: B023
                          what=f"the local cluster to stop at {how}")
        assert not Path(out["run_dir"]).exists() and not (d / "run" / "cluster.json").exists()


def test_address_auto_only_connects(tmp_path: Path) -> None:
    lines = _finished(_driver(tmp_path, """
        import tessera
        from tessera.client import ClusterNotFoundError
        try:
            tessera.init(address="auto")
        except ClusterNotFoundError as e:
            print("refused:", e)
        print("initialized", tessera.is_initialized())
    """), timeout=60)
    assert lines[0].startswith("refused: tessera.init(address='auto') found no running Tessera cluster")
    assert lines[1] == "initialized False"
    assert not list((tmp_path / "tmp").iterdir())  # nothing was started


def test_address_auto_connects_to_the_running_cluster(cluster: stacks.Cluster) -> None:
    env = {**cluster.env, "OTEL_TRACES_EXPORTER": "none"}
    code = "import tessera\ntessera.init(address='auto')\nprint(tessera._api.state().started)\ntessera.shutdown()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["None"], r.stdout + r.stderr
