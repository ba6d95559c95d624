"""The store's arena size at start: the default, a stale arena's room, and a size refused before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tessera.common.config import Settings
from tessera.common.sizing import free_bytes, object_store_size
from tessera.object_store.server import store_size

MiB = 2**20


def test_default_comes_from_the_one_sizing_function(tmp_path: Path) -> None:
    s = store_size(Settings(object_store_memory=0, object_store_arena_dir=tmp_path), tmp_path / "tessera-x.arena")
    want = object_store_size(0, tmp_path)
    assert s.requested == 0 and s.memory == want.memory
    assert abs(s.capacity - want.capacity) <= 64 * MiB  # the file system's free space may move between the calls


def test_a_stale_arena_of_this_node_counts_as_room(tmp_path: Path) -> None:
    arena = tmp_path / "tessera-x.arena"
    with open(arena, "wb") as f:
        f.write(os.urandom(32 * MiB))  # allocated blocks, given back when the new arena replaces the file
        f.flush()
        os.fsync(f.fileno())
    s = store_size(Settings(object_store_memory=0, object_store_arena_dir=tmp_path), arena)
    assert abs(s.arena_free - free_bytes(tmp_path) - 32 * MiB) < 4 * MiB  # (others may write meanwhile)


def test_a_store_refuses_to_start_with_a_size_its_arena_directory_cannot_hold(tmp_path: Path) -> None:
    too_big = free_bytes(tmp_path) + 2**50
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_", "OTEL_"))}
    env.update(TESSERA_OBJECT_STORE_MEMORY=str(too_big), TESSERA_OBJECT_STORE_ARENA_DIR=str(tmp_path),
               TESSERA_RUN_DIR=str(tmp_path / "run"), OTEL_TRACES_EXPORTER="none",
               TESSERA_NATS_URL="nats://127.0.0.1:1", TESSERA_CONTROL_STORE_ADDRESS="127.0.0.1:1")
    r = subprocess.run([sys.executable, "-m", "tessera.object_store"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
    assert f"TESSERA_OBJECT_STORE_MEMORY={too_big}" in last and f"does not fit in {tmp_path}" in last, r.stderr
    assert not list(tmp_path.glob("*.arena")), "no arena may be made for a refused size"
