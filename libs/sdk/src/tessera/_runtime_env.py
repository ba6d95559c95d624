"""``runtime_env``, as Ray's: what a task's or actor's worker runs with, beyond the node's own environment.

Supported keys: ``env_vars`` (set in the worker's process), ``working_dir`` (a local folder or .zip: the
worker runs in it, with it on ``sys.path``) and ``py_modules`` (local folders, .py files or .zips, or
imported modules: on the worker's ``sys.path``). Folders and files are packed by
:mod:`tessera.common.packages`, content-addressed, and stored once in the control store's KV; a worker's
node unpacks each package once and keeps it. A runtime_env is resolved (its paths replaced by package
uris) where it is given, in the driver, so every worker of the cluster reads the same code.

The node agent runs each distinct runtime_env in workers of its own (as Ray's dedicated workers per
runtime_env): environment variables, the working directory and ``sys.path`` are process state, so a
worker never serves two runtime_envs and nothing leaks from one task into a later one.

A task's or actor's runtime_env is merged over the job's as Ray merges them: its ``env_vars`` are added to
the job's (its own win), and each other key it sets replaces the job's.
"""

from __future__ import annotations

import json
import threading
import types
from pathlib import Path
from typing import Any

from tessera.common import packages
from tessera.common.names import RUNTIME_ENV_VAR

SUPPORTED = ("env_vars", "py_modules", "working_dir")
#: Ray's keys that install software; refused until Tessera can build such environments.
NOT_SUPPORTED = ("conda", "container", "image_uri", "pip", "uv")
#: The worker's environment variable that carries its resolved runtime_env.
ENV_VAR = RUNTIME_ENV_VAR

_lock = threading.Lock()
_stored: set[tuple[str, str]] = set()  # (cluster, uri) known to be in the cluster's KV
#: Packages this process stored (it found them absent); what it found stored already is not counted.
uploads = 0


def validate(env: Any) -> dict[str, Any]:
    """``env`` checked as Ray checks it; a copy. TypeError, ValueError or NotImplementedError say what is wrong."""
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise TypeError(f"runtime_env must be a dict, got {type(env).__name__}")
    for k in env:
        if k in NOT_SUPPORTED:
            raise NotImplementedError(
                f"runtime_env[{k!r}] is not supported yet: install what the tasks need into the cluster's Python "
                f"environment; supported keys: {', '.join(SUPPORTED)}")
        if k not in SUPPORTED:
            raise ValueError(f"unknown runtime_env key {k!r}; supported keys: {', '.join(SUPPORTED)}")
    out: dict[str, Any] = {}
    ev = env.get("env_vars")
    if ev is not None:
        if not isinstance(ev, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ev.items()):
            raise TypeError(f"runtime_env['env_vars'] must be a dict of str to str, got {ev!r}")
        if any(not k or "=" in k or "\0" in k or "\0" in v for k, v in ev.items()):
            raise ValueError(f"runtime_env['env_vars'] holds a name or value no environment can: {ev!r}")
        out["env_vars"] = dict(ev)
    wd = env.get("working_dir")
    if wd is not None:
        out["working_dir"] = _local("working_dir", wd, modules=False)
    mods = env.get("py_modules")
    if mods is not None:
        if not isinstance(mods, list | tuple):
            raise TypeError(f"runtime_env['py_modules'] must be a list, got {type(mods).__name__}")
        out["py_modules"] = [_local("py_modules", m, modules=True) for m in mods]
    return out


def _local(key: str, value: Any, *, modules: bool) -> str:
    """A path or package uri of ``key``; a module (py_modules) as its folder or file."""
    if modules and isinstance(value, types.ModuleType):
        f = getattr(value, "__file__", None)
        if not f:
            raise ValueError(f"runtime_env['py_modules']: module {value.__name__} has no file to ship")
        p = Path(f)
        value = str(p.parent if p.name == "__init__.py" else p)
    if not isinstance(value, str | Path):
        raise TypeError(f"runtime_env[{key!r}] takes a local path, got {type(value).__name__}")
    s = str(value)
    if s.startswith(packages.SCHEME):
        packages.key_of(s)  # InvalidArgumentError (a ValueError) when malformed
        return s
    if "://" in s:
        raise NotImplementedError(f"runtime_env[{key!r}]: remote URIs ({s}) are not supported yet; give a local path")
    p = Path(s).expanduser()
    if not p.exists():
        raise ValueError(f"runtime_env[{key!r}]: {s} does not exist")
    if p.is_file() and p.suffix != ".zip" and not (modules and p.suffix == ".py"):
        raise ValueError(f"runtime_env[{key!r}]: {s} must be a folder or a .zip" + (" or a .py file" if modules else ""))
    return str(p.resolve())


def merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``parent``, as Ray merges a task's runtime_env over the job's."""
    out = {**parent, **child}
    if "env_vars" in parent and "env_vars" in child:
        out["env_vars"] = {**parent["env_vars"], **child["env_vars"]}
    return out


def resolve(env: dict[str, Any], cs: Any, cluster: str) -> dict[str, Any]:
    """``env`` (validated) with each local path packed, stored in the cluster's KV unless there, and replaced by
    its uri. ``cs``: the control store's stub."""
    out = dict(env)
    if "working_dir" in env:
        out["working_dir"] = _upload(env["working_dir"], cs, cluster, module=False)
    if "py_modules" in env:
        out["py_modules"] = [_upload(m, cs, cluster, module=True) for m in env["py_modules"]]
    return out


def _upload(path: str, cs: Any, cluster: str, *, module: bool) -> str:
    global uploads
    if path.startswith(packages.SCHEME):
        return path
    import grpc

    from tessera.api.control_store.v1 import control_store_pb2 as cpb

    p = Path(path)
    if p.suffix == ".zip" and p.is_file():
        uri, blob = packages.of_zip(p)
    else:  # a py_modules folder keeps its name, so `import <name>` finds it on the unpacked root
        uri, blob = packages.pack(p, prefix=p.name + "/" if module and p.is_dir() else "")
    with _lock:
        if (cluster, uri) in _stored:
            return uri
    try:
        created = cs.KvPut(cpb.KvPutRequest(namespace=packages.NAMESPACE, key=packages.key_of(uri), value=blob,
                                            overwrite=False), timeout=60.0).created
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:  # type: ignore[attr-defined]
            raise
        created = False
    with _lock:
        _stored.add((cluster, uri))
        uploads += int(created)
    return uri


def dumps(env: dict[str, Any]) -> str:
    """The canonical text of a resolved runtime_env (the key workers are pooled by); "" for none."""
    return json.dumps(env, sort_keys=True, separators=(",", ":")) if env else ""
