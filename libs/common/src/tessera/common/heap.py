"""Giving the memory a process freed back to the operating system.

glibc's allocator keeps freed memory for reuse: a service that received a message of
tens of megabytes (parameters uploaded to a serving replica) and freed it again keeps
most of it resident, in holes of its heaps that no later allocation may fill.
:func:`trim` hands every free page of every malloc arena back (``malloc_trim(0)``); it
costs a walk over the heaps (about a millisecond for a few hundred MB), so it is for
after rare, large operations, not for every request. Where the C library has no
``malloc_trim`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any

_lock = threading.Lock()
_trim: Any = None
_loaded = False


def _malloc_trim() -> Any:
    global _trim, _loaded
    with _lock:
        if not _loaded:
            _loaded = True
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                fn = libc.malloc_trim
            except (OSError, AttributeError):
                fn = None
            if fn is not None:
                fn.argtypes = [ctypes.c_size_t]
                fn.restype = ctypes.c_int
            _trim = fn
        return _trim


def trim() -> bool:
    """Return the free pages of the process's heaps to the system; True if the C library could."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
