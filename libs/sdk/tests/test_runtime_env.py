"""runtime_env checked and merged as Ray does, before anything reaches a cluster (none is needed here)."""

from __future__ import annotations

from pathlib import Path

import pytest

import tessera
from tessera import _runtime_env


def test_supported_keys_are_checked_and_paths_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wd").mkdir()
    (tmp_path / "mod.py").write_text("X = 1\n")
    monkeypatch.chdir(tmp_path)
    env = _runtime_env.validate({"env_vars": {"A": "1"}, "working_dir": "wd", "py_modules": ["mod.py", tessera]})
    assert env["working_dir"] == str(tmp_path / "wd")
    assert env["py_modules"][0] == str(tmp_path / "mod.py")
    assert Path(env["py_modules"][1]) == Path(tessera.__file__).parent  # a package: its folder
    assert _runtime_env.validate(None) == {}


@pytest.mark.parametrize("key", ["pip", "conda", "container", "uv", "image_uri"])
def test_environment_builders_are_not_supported_yet(key: str) -> None:
    with pytest.raises(NotImplementedError, match=rf"runtime_env\['{key}'\] is not supported yet.*supported keys: "
                                                  "env_vars, py_modules, working_dir"):
        _runtime_env.validate({key: ["requests"]})


@pytest.mark.parametrize(("env", "error", "match"), [
    ({"bogus": 1}, ValueError, "unknown runtime_env key 'bogus'; supported keys: env_vars, py_modules, working_dir"),
    ({"env_vars": {"A": 1}}, TypeError, "must be a dict of str to str"),
    ({"env_vars": {"A=B": "1"}}, ValueError, "no environment can"),
    ({"py_modules": "mod"}, TypeError, "must be a list"),
    ({"working_dir": 3}, TypeError, "takes a local path"),
    ({"working_dir": "s3://bucket/wd.zip"}, NotImplementedError, "remote URIs"),
    ({"working_dir": "pkg:nothex"}, ValueError, "pkg:<sha256 hex>"),
    (["env_vars"], TypeError, "must be a dict"),
])
def test_bad_runtime_envs_say_what_is_wrong(env: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        _runtime_env.validate(env)


def test_a_tasks_runtime_env_merges_over_the_jobs_as_in_ray() -> None:
    job = {"env_vars": {"A": "job", "B": "job"}, "working_dir": "pkg:" + "1" * 64}
    task = {"env_vars": {"B": "task"}, "working_dir": "pkg:" + "2" * 64}
    assert _runtime_env.merge(job, task) == {"env_vars": {"A": "job", "B": "task"}, "working_dir": "pkg:" + "2" * 64}
    assert _runtime_env.merge(job, {"py_modules": []}) == {**job, "py_modules": []}


def test_options_refuse_a_bad_runtime_env_at_once() -> None:
    @tessera.remote
    def f() -> int:
        return 1

    with pytest.raises(NotImplementedError, match="pip"):
        f.options(runtime_env={"pip": ["numpy"]})
    with pytest.raises(ValueError, match="unknown runtime_env key 'nope'"):
        tessera.remote(runtime_env={"nope": 1})(f._fn)
