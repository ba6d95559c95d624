"""Giving the memory a process freed back to the operating system.

glibc's allocator keeps freed memory for reuse: a service that received a message of
tens of megabytes (parameters uploaded to a serving replica) and freed it again keeps
most of it resident, in holes of its heaps that later allocations seldom fill. Two
remedies, for processes that keep large data elsewhere (shared memory) and must not
keep their messages' copies:

- :func:`map_large_blocks` makes every allocation of at least ``threshold`` bytes a
  mapping of its own, unmapped when freed (glibc otherwise raises that threshold to
  the largest block freed so far, up to 32 MB, and serves later large blocks from
  its heaps);
- :func:`trim` hands every free page of every malloc arena back (``malloc_trim(0)``);
  it walks the heaps (a few ms for a few hundred MB), so it is for after rare, large
  operations, not for every request.

Where the C library has neither (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any

#: mallopt's parameter number of the mmap threshold (glibc's M_MMAP_THRESHOLD).
M_MMAP_THRESHOLD = -3
#: Blocks at least this large are mapped on their own by default (:func:`map_large_blocks`).
LARGE_BLOCK = 256 * 1024

_lock = threading.Lock()
_libc: Any = None
_loaded = False


def _c_function(name: str, argtypes: list[Any]) -> Any:
    global _libc, _loaded
    with _lock:
        if not _loaded:
            _loaded = True
            try:
                _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            except OSError:
                _libc = None
    fn = getattr(_libc, name, None) if _libc is not None else None
    if fn is not None:
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return fn


def _malloc_trim() -> Any:
    return _c_function("malloc_trim", [ctypes.c_size_t])


def map_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Serve every allocation of at least ``threshold`` bytes from a mapping of its own, given back to the
    system as soon as it is freed; True if the C library could (glibc's ``mallopt``)."""
    fn = _c_function("mallopt", [ctypes.c_int, ctypes.c_int])
    return fn is not None and bool(fn(M_MMAP_THRESHOLD, int(threshold)))


def trim() -> bool:
    """Return the free pages of the process's heaps to the system; True if the C library could."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
