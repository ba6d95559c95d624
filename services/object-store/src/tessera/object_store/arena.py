"""The shared-memory arena: one file (under /dev/shm by default) mapped by the store and its clients.

The store maps it read-write and hands out offsets; clients on the same node map
the same path (read-only to read objects, read-write to fill objects they
created) and read or write objects in place, without a copy through a socket.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
from pathlib import Path

from tessera.common import prefault
from tessera.common.errors import InvalidArgumentError, ResourceExhaustedError

#: Default directory of arena files: tmpfs, so the arena is memory, not disk.
DEFAULT_DIR = Path("/dev/shm")

# The value of MADV_POPULATE_WRITE on Linux (5.14+); the mmap module names it from Python 3.13 on.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform.startswith("linux") else None)


class Arena:
    """A file of ``size`` bytes, created (replacing a stale file at ``path``) and mapped read-write.

    With ``reserve`` the file's memory is allocated at once (``posix_fallocate``),
    so a tmpfs too small for the arena fails here with ResourceExhaustedError and
    not later with SIGBUS when a write reaches a page tmpfs cannot supply. Without
    it pages are taken on first write (as Ray's object store does); a file system
    with less free space than ``size`` still fails here.

    :meth:`attach` maps an existing arena (a client's view). Views returned by
    :meth:`view` must be dropped (or released) before :meth:`close` can unmap.
    """

    path: Path
    size: int
    writable: bool

    def __init__(self, path: str | os.PathLike[str], size: int, *, reserve: bool = True) -> None:
        if size <= 0:
            raise InvalidArgumentError(f"arena size must be > 0, got {size}")
        path = Path(path)
        try:
            path.unlink()  # a stale arena of an earlier run: mappers of it keep their inode
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, size)
            if reserve:
                _reserve(fd, size, path)
            else:
                _check_room(fd, size, path)
            self._map(path, fd, size, writable=True)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise

    @classmethod
    def attach(cls, path: str | os.PathLike[str], *, writable: bool = False) -> Arena:
        """Map the existing arena at ``path``: read-only unless ``writable``."""
        path = Path(path)
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size <= 0:
                raise InvalidArgumentError(f"arena file {path} is empty")
            self = cls.__new__(cls)
            self._map(path, fd, size, writable=writable)
        except BaseException:
            os.close(fd)
            raise
        return self

    def _map(self, path: Path, fd: int, size: int, *, writable: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._mm: mmap.mmap | None = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
        self._fd: int | None = fd
        self._buf = memoryview(self._mm)
        self.path, self.size, self.writable = path, size, writable
        self._written: prefault.WrittenPages | None = None
        if writable:
            anchor = ctypes.c_char.from_buffer(self._mm)
            self._written = prefault.WrittenPages(ctypes.addressof(anchor), size)
            del anchor  # (no export of the mapping may outlive this, or it could not be closed)

    # ------------------------------------------------------------------ access

    def view(self, offset: int, size: int) -> memoryview:
        """The bytes ``[offset, offset + size)`` of the arena, in place (read-only for a read-only map)."""
        if offset < 0 or size < 0 or offset + size > self.size:
            raise InvalidArgumentError(f"range [{offset}, {offset + size}) is outside the arena of {self.size} bytes")
        if self._mm is None:
            raise ValueError(f"arena {self.path} is closed")
        return self._buf[offset:offset + size]

    def prepare_write(self, offset: int, size: int) -> None:
        """Before writing ``[offset, offset + size)`` (a large object arriving from a peer or a stream): map
        its pages in one call rather than a fault per page (see :mod:`tessera.common.prefault`). Blocks while
        the kernel maps them (about a millisecond per 20 MB): call it off the event loop.

        Raises:
            ResourceExhaustedError: the file system behind the arena cannot supply the pages.
        """
        if self._written is not None and self._mm is not None:
            self._written.prepare(offset, size)

    def warm(self, offset: int, size: int) -> None:
        """Give ``[offset, offset + size)`` memory now (``fallocate``: the file system allocates and zeroes its
        pages in one call, cheaper than a fault per page) and map it in this process (:meth:`prepare_write`).
        Writes into the range then take no page faults here, and a client mapping it finds the pages allocated:
        it only maps them. Contents are unchanged (allocated pages are left as they are). Blocks: call it off
        the event loop.

        Raises:
            ResourceExhaustedError: the file system behind the arena cannot supply the pages.
        """
        if offset < 0 or size < 0 or offset + size > self.size:
            raise InvalidArgumentError(f"range [{offset}, {offset + size}) is outside the arena of {self.size} bytes")
        if not self.writable or self._mm is None or self._fd is None or size == 0:
            return
        try:
            os.posix_fallocate(self._fd, offset, size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ResourceExhaustedError(f"no room for {size} more bytes of arena {self.path}: the file "
                                             f"system is full") from e
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        self.prepare_write(offset, size)

    @property
    def closed(self) -> bool:
        return self._mm is None

    def prefault(self) -> str:
        """Touch every page now, so the first writes into the arena take no page faults.

        Uses ``madvise(MADV_POPULATE_WRITE)`` where the kernel has it, else writes
        one byte of every page back to itself (numpy, strided), which keeps the
        contents. Returns the method used: ``"madvise"`` or ``"touch"``.
        """
        if not self.writable or self._mm is None:
            raise ValueError(f"arena {self.path} is not mapped writable")
        if _MADV_POPULATE_WRITE is not None:
            try:
                self._mm.madvise(_MADV_POPULATE_WRITE)
                return "madvise"
            except OSError as e:
                if e.errno in (errno.ENOMEM, errno.EFAULT):  # tmpfs could not supply the pages
                    raise ResourceExhaustedError(f"cannot populate arena {self.path} of {self.size} bytes: "
                                                 f"{e.strerror}") from e
                # EINVAL: a kernel older than 5.14; touch the pages instead
        self._touch()
        return "touch"

    def _touch(self) -> None:
        import numpy as np  # only on kernels without MADV_POPULATE_WRITE

        pages = np.frombuffer(self._buf, dtype=np.uint8)[::mmap.PAGESIZE]
        try:
            pages |= 0  # a read and a write of each page's first byte: a write fault per page
        finally:
            del pages

    # -------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Unmap and close the file. A mapping still referenced by live views stays until they are dropped."""
        mm, fd = self._mm, self._fd
        self._mm = self._fd = None
        if mm is not None:
            try:
                self._buf.release()
                mm.close()
            except BufferError:  # views are still alive: the mapping goes with the last of them
                pass
        if fd is not None:
            os.close(fd)

    def unlink(self) -> None:
        """Remove the file (new clients can no longer map it; existing mappings stay valid)."""
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "rw" if self.writable else "ro"
        return f"Arena({str(self.path)!r}, size={self.size}, {mode}{', closed' if self._mm is None else ''})"


def _check_room(fd: int, size: int, path: Path) -> None:
    st = os.fstatvfs(fd)
    if st.f_bavail * st.f_frsize < size:
        raise ResourceExhaustedError(f"no room for an arena of {size} bytes at {path}: the file system has "
                                     f"{st.f_bavail * st.f_frsize} bytes free")


def _reserve(fd: int, size: int, path: Path) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ResourceExhaustedError(f"no room for an arena of {size} bytes at {path}: the file system is "
                                         f"full or too small") from e
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
