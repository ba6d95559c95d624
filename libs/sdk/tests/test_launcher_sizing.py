"""tessera up's object-store sizes: split between the nodes of one host, written to the plan, given to each store."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera._launcher import cli
from tessera._launcher.rundir import RunDir
from tessera._launcher.supervisor import Supervisor
from tessera.common.config import Settings
from tessera.common.errors import InvalidArgumentError
from tessera.common.sizing import PAGE, free_bytes


def test_nodes_of_one_host_split_the_default(tmp_path: Path) -> None:
    settings = Settings(object_store_memory=0, object_store_arena_dir=tmp_path)
    one, two = cli.store_size(settings, 1), cli.store_size(settings, 2)
    if one.capped or two.capped:
        pytest.skip(f"{tmp_path} has less free space than 30% of this machine's memory")
    assert two.capacity == int(one.memory.bytes * 0.3) // 2 // PAGE * PAGE
    assert "split over 2 nodes" in two.describe()


def test_the_plan_gives_each_store_its_size_and_the_supervisor_passes_it_on(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TESSERA_OBJECT_STORE_MEMORY", raising=False)
    run = RunDir(tmp_path / "run")
    run.prepare()
    settings = Settings(object_store_memory=0)
    cluster = cli._plan(run, settings, 1, nodes=2, services=("control-store", "object-store", "task-scheduler"),
                        object_store_memory=123 * PAGE)
    stores = [p for p in cluster.procs if p.service == "object-store"]
    assert len(stores) == 2 and all(p.object_store_memory == 123 * PAGE for p in stores)
    assert all(p.object_store_memory == 0 for p in cluster.procs if p.service != "object-store")
    run.write(cluster)
    assert run.read() == cluster  # the figure survives cluster.json
    sup = Supervisor(run)
    for p in cluster.procs:
        if p.kind != "service":
            continue
        env = sup.command(p)[1]
        assert env is not None
        if p.service == "object-store":
            assert env["TESSERA_OBJECT_STORE_MEMORY"] == str(123 * PAGE)
        else:
            assert "TESSERA_OBJECT_STORE_MEMORY" not in env


def test_an_override_that_cannot_fit_is_refused_by_the_launcher(tmp_path: Path) -> None:
    settings = Settings(object_store_memory=free_bytes(tmp_path) + 2**50, object_store_arena_dir=tmp_path)
    with pytest.raises(InvalidArgumentError, match=f"does not fit in {tmp_path}"):
        cli.store_size(settings, 1)
