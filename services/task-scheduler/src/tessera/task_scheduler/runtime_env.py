"""A worker's runtime_env: what the node agent sets in a worker's environment, and what the worker sets up
in its process before it serves (the SDK's ``tessera._runtime_env`` validates and resolves it).

The worker unpacks each package (``working_dir``, ``py_modules``) into the node's cache once: a folder per
node and package, named by the package's digest, kept for the node's later workers (content-addressed, so
a package never changes under a name). ``py_modules`` go on ``sys.path``; the ``working_dir`` becomes the
current directory and goes first on ``sys.path``, as in Ray (a zip given as ``working_dir``: its root).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tessera.common import packages
from tessera.common.errors import InvalidArgumentError
from tessera.common.names import RUNTIME_ENV_VAR as ENV_VAR

__all__ = ["ENV_VAR", "check", "env_vars", "parse", "setup"]
#: The keys a resolved runtime_env may hold (the SDK turns working_dir and py_modules into package uris).
KEYS = ("env_vars", "py_modules", "working_dir")


def parse(text: str) -> dict[str, Any]:
    """The runtime_env a spec or the worker's environment carries ("" or "{}": none); ValueError if malformed."""
    if not text:
        return {}
    env = json.loads(text)
    if not isinstance(env, dict):
        raise ValueError(f"a runtime_env must be a JSON object, got {text[:80]!r}")
    return env


@functools.lru_cache(maxsize=256)  # a job's tasks repeat a few runtime_envs: each is checked once
def check(text: str) -> None:
    """Refuse a runtime_env a task spec cannot carry (InvalidArgumentError says why): not a JSON object, a key
    other than KEYS, env_vars not of str to str, or a package that is not a ``pkg:`` uri."""
    try:
        env = parse(text)
    except ValueError as e:
        raise InvalidArgumentError(f"runtime_env is not a JSON object: {e}") from None
    unknown = sorted(set(env) - set(KEYS))
    if unknown:
        raise InvalidArgumentError(f"runtime_env has unknown key(s) {', '.join(unknown)}; supported: {', '.join(KEYS)}")
    ev = env.get("env_vars", {})
    if not isinstance(ev, dict) or not all(isinstance(k, str) and k and isinstance(v, str) for k, v in ev.items()):
        raise InvalidArgumentError("runtime_env env_vars must map names to strings")
    mods = env.get("py_modules", [])
    uris = [*(mods if isinstance(mods, list) else [None]), *([env["working_dir"]] if "working_dir" in env else [])]
    for uri in uris:
        if not isinstance(uri, str):
            raise InvalidArgumentError("runtime_env working_dir and py_modules must be package uris")
        packages.key_of(uri)


def env_vars(text: str) -> dict[str, str]:
    """The environment variables a worker of runtime_env ``text`` is started with."""
    try:
        ev = parse(text).get("env_vars") or {}
    except ValueError:
        return {}  # the worker reports the malformed runtime_env to the tasks it is given
    return {str(k): str(v) for k, v in ev.items()} if isinstance(ev, dict) else {}


def setup(text: str, cache: Path, fetch: Callable[[str], bytes]) -> None:
    """Set this process up for runtime_env ``text``: unpack its packages under ``cache`` (``fetch(uri)``: a
    package's bytes), put them on ``sys.path`` and enter the working_dir. Raises what went wrong."""
    env = parse(text)
    paths: list[str] = []
    for uri in env.get("py_modules") or []:
        paths.append(str(_unpacked(uri, cache, fetch)))
    wd = env.get("working_dir")
    if wd:
        root = _unpacked(wd, cache, fetch)
        os.chdir(root)
        paths.insert(0, str(root))
    sys.path[:0] = [p for p in paths if p not in sys.path]


def _unpacked(uri: str, cache: Path, fetch: Callable[[str], bytes]) -> Path:
    dest = cache / packages.key_of(uri).decode()
    if (dest / ".complete").exists():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    return packages.unpack(uri, fetch(uri), dest)
