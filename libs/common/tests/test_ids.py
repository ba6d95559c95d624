from __future__ import annotations

import pytest

from tessera.common import ids
from tessera.common.errors import InvalidArgumentError, TesseraError


@pytest.mark.parametrize(("kind", "n"), [("node_id", 16), ("job_id", 4), ("task_id", 16), ("actor_id", 16),
                                         ("object_id", 20), ("function_id", 32)])
def test_check_id_lengths(kind: str, n: int) -> None:
    good = bytes(range(n))
    assert ids.check_id(kind, good) is good
    assert len(ids.new_id(kind)) == n
    with pytest.raises(InvalidArgumentError) as e:
        ids.check_id(kind, good + b"x")
    assert str(e.value) == f"{kind} must be {n} bytes, got {n + 1} bytes"
    with pytest.raises(InvalidArgumentError) as e:
        ids.check_id(kind, good[:-1])
    assert str(e.value) == f"{kind} must be {n} bytes, got {n - 1} bytes"


def test_check_id_empty_and_field_name() -> None:
    with pytest.raises(InvalidArgumentError) as e:
        ids.check_id("task_id", b"", field="spec.task_id")
    assert str(e.value) == "spec.task_id must be 16 bytes, got empty"
    assert e.value.code == "INVALID_ARGUMENT"
    assert isinstance(e.value, ValueError) and isinstance(e.value, TesseraError)


def test_check_id_unknown_kind() -> None:
    with pytest.raises(KeyError):
        ids.check_id("widget_id", b"1234")


def test_new_ids_are_random() -> None:
    assert len({ids.new_id("task_id") for _ in range(100)}) == 100


def test_object_id_round_trip() -> None:
    tid = ids.new_id("task_id")
    for index in (0, 1, 7, 2**32 - 1):
        oid = ids.object_id(tid, index)
        assert len(oid) == ids.OBJECT_ID_LEN
        assert oid[:16] == tid
        assert ids.producer_task_id(oid) == tid
        assert ids.return_index(oid) == index
    assert ids.object_id(tid, 1) == tid + b"\x00\x00\x00\x01"


def test_new_object_id_is_a_put_object() -> None:
    oid = ids.new_id("object_id")
    assert len(oid) == 20 and ids.return_index(oid) == 0


def test_object_id_rejects_bad_input() -> None:
    tid = ids.new_id("task_id")
    with pytest.raises(InvalidArgumentError, match="return index out of range: -1"):
        ids.object_id(tid, -1)
    with pytest.raises(InvalidArgumentError, match="return index out of range"):
        ids.object_id(tid, 2**32)
    with pytest.raises(InvalidArgumentError, match="task_id must be 16 bytes, got 15 bytes"):
        ids.object_id(tid[:15], 1)
    with pytest.raises(InvalidArgumentError, match="object_id must be 20 bytes, got 16 bytes"):
        ids.producer_task_id(tid)
    with pytest.raises(InvalidArgumentError, match="object_id must be 20 bytes, got empty"):
        ids.return_index(b"")
