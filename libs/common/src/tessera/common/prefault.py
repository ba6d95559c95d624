"""Mapping pages of shared memory before a large write into them, in one system call.

A process writing into pages of a shared mapping that are not in its page table
yet takes one page fault per 4 KiB page (a write fault maps no neighbours, unlike
a read fault): a 100 MB object is 25,600 faults, which can cost more than the
copy itself. ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+) maps the whole range
at once, several times faster. It is not free on pages already mapped (the
kernel still walks them), so :class:`WrittenPages` remembers which blocks of a
mapping this process has prepared and asks only for the others.

Nothing here changes what memory holds: populating allocates (zeroed) pages
that were not allocated yet and maps them; it writes no byte. Where the kernel
lacks the call, writes simply take their faults as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import sys
import threading

from tessera.common.errors import ResourceExhaustedError

#: madvise(2) advice: populate (prefault) page tables writable (Linux 5.14+).
MADV_POPULATE_WRITE = 23
#: Writes smaller than this are not prepared: their few faults cost less than the call.
MIN_BYTES = 1 << 20
#: Granularity of what :class:`WrittenPages` remembers.
BLOCK = 1 << 16

_PAGE = mmap.PAGESIZE
_lock = threading.Lock()
_madvise: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
_supported = sys.platform.startswith("linux")


def _load() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    global _madvise, _supported
    with _lock:
        if _madvise is None and _supported:
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                fn = libc.madvise
            except (OSError, AttributeError):
                _supported = False
                return None
            fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            fn.restype = ctypes.c_int
            _madvise = fn
        return _madvise


def populate_write(address: int, length: int) -> bool:
    """Map ``[address, address + length)`` (widened to whole pages) writable in this process's page table.

    The range must lie inside one mapping (a mapping starts and ends on page bounds, so the widening
    stays inside it). Returns False where the kernel cannot (then nothing was done); the GIL is released
    meanwhile.

    Raises:
        ResourceExhaustedError: the file system behind the mapping cannot supply the pages (a write into
            them would have been killed by SIGBUS).
    """
    global _supported
    if length <= 0 or not _supported:
        return False
    fn = _load()
    if fn is None:
        return False
    start = address - address % _PAGE
    end = address + length
    end += (-end) % _PAGE
    if fn(start, end - start, MADV_POPULATE_WRITE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # a kernel without it (or a mapping it refuses)
        if err != errno.EPERM:
            _supported = False
        return False
    if err in (errno.ENOMEM, errno.EFAULT):
        raise ResourceExhaustedError(f"cannot map {end - start} bytes of shared memory for writing: "
                                     f"{errno.errorcode[err]} (is the file system behind it full?)")
    return False


class WrittenPages:
    """Which blocks of one mapping (``size`` bytes at ``base``) this process has mapped for writing.

    :meth:`prepare` before writing ``[offset, offset + length)``: the blocks of it not prepared before are
    populated in one call. Only a hint: a block forgotten or remembered wrongly costs faults, never data.
    """

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size
        self._done = bytearray((size + BLOCK - 1) // BLOCK)
        self._lock = threading.Lock()
        self.populated = 0  # bytes populated so far (for tests and metrics)

    def prepare(self, offset: int, length: int) -> None:
        if length < MIN_BYTES or offset < 0 or offset + length > self.size or not _supported:
            return
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        with self._lock:
            todo = self._done.find(0, first, last + 1)
        if todo < 0:
            return
        # from the first block not prepared to the end of the range: one call (the blocks prepared among them
        # cost the kernel a walk of their page table, far less than a call per gap)
        start = max(offset, todo * BLOCK)
        if not populate_write(self.base + start, offset + length - start):
            return
        self.populated += offset + length - start
        # blocks wholly inside the range are now mapped; the partial blocks at its ends may not be
        lo = (offset + BLOCK - 1) // BLOCK
        hi = (offset + length) // BLOCK
        if hi > lo:
            with self._lock:
                self._done[lo:hi] = b"\1" * (hi - lo)

    def forget(self) -> None:
        """The mapping was replaced: nothing of the new one is mapped yet."""
        with self._lock:
            self._done[:] = bytes(len(self._done))
