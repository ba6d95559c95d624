"""Fixed-length binary identifiers, checked at every boundary.

An ObjectID is the 16-byte TaskID of the task that produced it followed by a
4-byte big-endian return index, so lineage (which task made which object) can be
read off the id itself, as in Ray.
"""

from __future__ import annotations

import os
from typing import Final

from tessera.common.errors import InvalidArgumentError

NODE_ID_LEN: Final = 16
JOB_ID_LEN: Final = 4
TASK_ID_LEN: Final = 16
ACTOR_ID_LEN: Final = 16
OBJECT_ID_LEN: Final = TASK_ID_LEN + 4
FUNCTION_ID_LEN: Final = 32  # sha256

_LENGTHS: Final = {
    "node_id": NODE_ID_LEN,
    "job_id": JOB_ID_LEN,
    "task_id": TASK_ID_LEN,
    "actor_id": ACTOR_ID_LEN,
    "object_id": OBJECT_ID_LEN,
    "function_id": FUNCTION_ID_LEN,
}


def check_id(kind: str, value: bytes, *, field: str | None = None) -> bytes:
    """Return ``value`` if it is a well-formed id of ``kind``; raise InvalidArgumentError otherwise."""
    want = _LENGTHS[kind]
    if len(value) != want:
        name = field or kind
        got = "empty" if not value else f"{len(value)} bytes"
        raise InvalidArgumentError(f"{name} must be {want} bytes, got {got}")
    return value


def new_id(kind: str) -> bytes:
    """A random id of ``kind`` (object ids: a random task id with return index 0)."""
    if kind == "object_id":
        return object_id(os.urandom(TASK_ID_LEN), 0)
    return os.urandom(_LENGTHS[kind])


def object_id(task_id: bytes, index: int) -> bytes:
    """The id of return ``index`` (1-based; 0 for ``put`` objects) of ``task_id``."""
    check_id("task_id", task_id)
    if not 0 <= index < 2**32:
        raise InvalidArgumentError(f"return index out of range: {index}")
    return task_id + index.to_bytes(4, "big")


def producer_task_id(oid: bytes) -> bytes:
    """The task that produced object ``oid``."""
    return check_id("object_id", oid)[:TASK_ID_LEN]


def return_index(oid: bytes) -> int:
    return int.from_bytes(check_id("object_id", oid)[TASK_ID_LEN:], "big")
