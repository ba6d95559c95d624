"""The object byte layout: out-of-band buffers, zero-copy reads, page-congruent placement."""

from __future__ import annotations

import mmap
import threading

import numpy as np
import pytest

from tessera.common.errors import InvalidArgumentError
from tessera.common.serialization import LARGE, PAGE, deserialize, serialize


def _addr(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


@pytest.mark.parametrize("value", [1, "text", b"bytes", {"k": [1, 2.5, None]}, (), np.arange(10)])
def test_round_trip(value: object) -> None:
    back = deserialize(serialize(value).to_bytes())
    if isinstance(value, np.ndarray):
        assert np.array_equal(back, value)
    else:
        assert back == value


def test_large_buffers_are_out_of_band_and_read_in_place() -> None:
    a = np.random.default_rng(1).random(100_000)
    s = serialize({"a": a, "b": b"x"})
    assert len(s.meta) < 1000 and sum(b.nbytes for b in s.buffers) == a.nbytes
    buf = bytearray(s.size)
    s.write_into(memoryview(buf))
    back = deserialize(memoryview(buf))
    assert np.array_equal(back["a"], a)
    assert np.shares_memory(back["a"], np.frombuffer(buf, dtype=np.uint8))  # a view, not a copy


@pytest.mark.parametrize("shift", [0, 16, 48, 64, 1000, 4032, 4080])
def test_large_buffer_lands_page_congruent_to_its_source(shift: int) -> None:
    base = np.zeros(LARGE * 4 + PAGE, dtype=np.uint8)
    start = (-_addr(base)) % PAGE + shift  # source at a chosen offset within a page
    src = base[start : start + LARGE * 2].view(np.float64)
    src[:] = np.arange(src.size)
    s = serialize(src)
    with mmap.mmap(-1, s.size + PAGE) as m:
        dst = np.frombuffer(m, dtype=np.uint8)
        off = 64 * 3  # the object sits 64-byte aligned in its arena
        s.write_into(memoryview(m)[off : off + s.size], dst_addr=_addr(dst) + off)
        back = deserialize(memoryview(m)[off : off + s.size])
        assert np.array_equal(back, src)
        assert _addr(back) % PAGE == _addr(src) % PAGE
        del back, dst


def test_bad_input() -> None:
    with pytest.raises(InvalidArgumentError, match="cannot serialize"):
        serialize(threading.Lock())
    assert deserialize(serialize(lambda x: x + 1).to_bytes())(1) == 2  # by value, as tasks need
    with pytest.raises(InvalidArgumentError, match="bad magic"):
        deserialize(b"XXXX" + bytes(40))
    with pytest.raises(InvalidArgumentError, match="too short"):
        deserialize(b"TS")
    good = serialize(np.arange(100_000)).to_bytes()
    with pytest.raises(InvalidArgumentError, match="past its end"):
        deserialize(good[: len(good) // 2])


@pytest.mark.parametrize("value", [7, {"a": np.arange(50_000.0), "b": np.ones((3, 40_000), np.int8), "c": b"z" * 10},
                                   [np.arange(5), np.arange(LARGE, dtype=np.uint8)]])
def test_pieces_laid_end_to_end_are_the_object_and_borrow_the_buffers(value: object) -> None:
    s = serialize(value)
    total, pieces = s.pieces()
    assert total == sum(len(p) for p in pieces) <= s.size
    back = deserialize(b"".join(pieces))
    if isinstance(value, dict):
        assert np.array_equal(back["a"], value["a"]) and np.array_equal(back["b"], value["b"]) and back["c"] == b"z" * 10
    elif isinstance(value, list):
        assert all(np.array_equal(x, y) for x, y in zip(back, value, strict=True))
    else:
        assert back == value
    arrays = [v for v in (value.values() if isinstance(value, dict) else value if isinstance(value, list) else [])
              if isinstance(v, np.ndarray)]
    for a in arrays:  # each array is a piece itself: the value's own memory, not a copy
        assert any(np.shares_memory(np.frombuffer(p, dtype=np.uint8), a) for p in pieces if len(p))
