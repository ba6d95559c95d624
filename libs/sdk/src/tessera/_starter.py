"""The local cluster ``tessera.init()`` starts when it finds none, as ``ray.init()`` does.

It is what ``tessera up`` starts (one node, default settings), in a run directory of its own under the
system's temporary directory, so it never takes the place of, or is taken for, the cluster of the
machine's run directory. ``tessera.shutdown()`` stops it, and so does the driver's exit; a driver killed
outright leaves it running (``TESSERA_RUN_DIR=<its dir> tessera down`` stops it).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tessera import _api

# Imported now, not when stopping: at the interpreter's exit, importing what registers atexit hooks fails.
from tessera._launcher.cli import _down
from tessera._launcher.rundir import RunDir
from tessera.client._discovery import ClusterInfo, ClusterNotFoundError, connected_to, find_cluster
from tessera.common.config import current_settings
from tessera.common.names import CLUSTER_FILE

log = logging.getLogger(__name__)

#: Seconds ``tessera up`` has to bring the local cluster to SERVING.
START_TIMEOUT_S = 120.0
#: The file in its run directory that marks a cluster as started by a driver (its pid).
OWNER_FILE = "started-by"

_at_exit = False
_running: set[str] = set()  # run directories of the clusters this process started and has not stopped


def _run_dir_cluster() -> Path | None:
    """The run directory's cluster file, if there is one. One whose supervisor died counts too: a cluster that
    crashed is reported as unreachable (as before), rather than silently replaced by a new one."""
    run = RunDir(current_settings().run_dir)
    return run.cluster_file if run.cluster_file.exists() else None


def find_or_start(address: str | None) -> tuple[str | None, ClusterInfo, str | None]:
    """What ``tessera.init(address)`` connects to: (the run directory of a cluster started for it, or None; the
    cluster; the address to remember, None for "auto")."""
    if address == "auto":
        return None, running_cluster(), None
    if address is None and none_running():
        run_dir, cluster = start_local()
        return run_dir, cluster, None
    return None, find_cluster(address), address


def none_running() -> bool:
    """No address to use (``TESSERA_ADDRESS``, an earlier ``init``'s) and no cluster in the run directory
    (``tessera down`` removes its file)."""
    from tessera.client import _discovery

    return not os.environ.get("TESSERA_ADDRESS") and not _discovery._connected and _run_dir_cluster() is None


def running_cluster() -> ClusterInfo:
    """``init(address="auto")``: ``TESSERA_ADDRESS``, else the run directory's live cluster; never a new one."""
    address = os.environ.get("TESSERA_ADDRESS")
    if address:
        return find_cluster(address)
    path = _run_dir_cluster()
    if path is None:
        raise ClusterNotFoundError(
            f"tessera.init(address='auto') found no running Tessera cluster (none in {current_settings().run_dir}, "
            "TESSERA_ADDRESS unset): start one with `tessera up`, or call tessera.init() to start a local one")
    return ClusterInfo.load(path)


def start_local() -> tuple[str, ClusterInfo]:
    """Start a one-node cluster with ``tessera up`` in a fresh run directory; (its path, where it is).

    Raises:
        ConnectionError: it did not come up (the message holds the end of ``tessera up``'s output).
    """
    run_dir = tempfile.mkdtemp(prefix="tessera-local-")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TESSERA_RUN_DIR", "TESSERA_ADDRESS", "TESSERA_NATS_URL", "TESSERA_REDIS_URLS")}
    env["TESSERA_RUN_DIR"] = run_dir
    Path(run_dir, OWNER_FILE).write_text(str(os.getpid()))
    log.info("no Tessera cluster found: starting a local one in %s", run_dir)
    try:
        up = subprocess.run([sys.executable, "-m", "tessera._launcher.cli", "up", "--timeout", f"{START_TIMEOUT_S:g}"],
                            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=START_TIMEOUT_S + 30)
    except subprocess.TimeoutExpired:
        stop_local(run_dir)
        raise ConnectionError(f"the local Tessera cluster did not start within {START_TIMEOUT_S:g}s") from None
    path = Path(run_dir) / CLUSTER_FILE
    if up.returncode != 0 or not path.exists():
        stop_local(run_dir)
        tail = "\n".join((up.stdout + up.stderr).strip().splitlines()[-15:])
        raise ConnectionError(f"could not start a local Tessera cluster (`tessera up` exited {up.returncode}):\n{tail}")
    _running.add(run_dir)
    _stop_at_exit()
    return run_dir, ClusterInfo.load(path)


def stop_local(run_dir: str) -> None:
    """Stop the cluster started in ``run_dir`` (everything it ran) and remove the directory."""
    _running.discard(run_dir)
    try:
        _down(RunDir(Path(run_dir)), timeout=30.0)
    except Exception as e:
        log.warning("could not stop the local Tessera cluster in %s: %s", run_dir, e)
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def _stop_at_exit() -> None:
    """Stop the started clusters when the interpreter exits (also one whose driver failed to connect)."""
    global _at_exit
    if not _at_exit:
        _at_exit = True
        atexit.register(_exit)


def _exit() -> None:
    try:
        _api.shutdown()
    finally:
        connected_to(None)
        for run_dir in list(_running):
            stop_local(run_dir)
