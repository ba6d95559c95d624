"""Working directories that travel with a job, as Ray's ``working_dir``: the Python files of a folder,
zipped, stored once in the control store's KV (namespace ``packages``, key: the zip's sha256) and
unpacked on the node that runs the job. So a job whose entry point is a file on the submitting machine
(a laptop, the host of a compose stack) runs on a node that has never seen that file.

Only source files go (``*.py``, and data files named in INCLUDE), at most MAX_BYTES in all; anything
bigger belongs in the object store. Packages are content-addressed, so resubmitting the same code
stores nothing new.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path, PurePosixPath

from tessera.common.errors import InvalidArgumentError

NAMESPACE = "packages"
SCHEME = "pkg:"
MAX_BYTES = 8 * 1024 * 1024
MAX_FILES = 2000
INCLUDE = (".py", ".json", ".txt", ".yaml", ".yml", ".toml")
_SKIP_DIRS = {"__pycache__", ".git", ".venv", "venv", "node_modules", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
_EPOCH = (1980, 1, 1, 0, 0, 0)


def pack(folder: Path, *, prefix: str = "") -> tuple[str, bytes]:
    """(uri, zip bytes) of ``folder``'s source files; the same files give the same bytes and uri.

    ``prefix``: a folder name the files are stored under (a ``py_modules`` package keeps its own name, so
    the unpacked root goes on ``sys.path`` and ``import <name>`` finds it)."""
    if folder.is_file():  # one module file: stored alone, under its own name
        return _zip([(prefix + folder.name, folder)], folder)
    files: list[tuple[str, Path]] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for n in sorted(names):
            if n.endswith(INCLUDE):
                p = Path(root) / n
                files.append((prefix + p.relative_to(folder).as_posix(), p))
        if len(files) > MAX_FILES:
            raise InvalidArgumentError(f"{folder} has more than {MAX_FILES} source files: too big to travel with a job")
    return _zip(files, folder)


def _zip(files: list[tuple[str, Path]], folder: Path) -> tuple[str, bytes]:
    buf = io.BytesIO()
    total = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for rel, p in files:
            data = p.read_bytes()
            total += len(data)
            if total > MAX_BYTES:
                raise InvalidArgumentError(f"the source files of {folder} exceed {MAX_BYTES // 2**20} MiB: "
                                           "too big to travel with a job (put data in the object store)")
            info = zipfile.ZipInfo(rel, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            z.writestr(info, data, zipfile.ZIP_DEFLATED)
    blob = buf.getvalue()
    return SCHEME + hashlib.sha256(blob).hexdigest(), blob


def of_zip(path: Path) -> tuple[str, bytes]:
    """(uri, bytes) of a zip file as it is (a ``working_dir`` or ``py_modules`` entry given as a .zip)."""
    blob = path.read_bytes()
    if len(blob) > MAX_BYTES:
        raise InvalidArgumentError(f"{path} is larger than {MAX_BYTES // 2**20} MiB: too big to travel with a job "
                                   "(put data in the object store)")
    if not zipfile.is_zipfile(io.BytesIO(blob)):
        raise InvalidArgumentError(f"{path} is not a zip file")
    return SCHEME + hashlib.sha256(blob).hexdigest(), blob


def key_of(uri: str) -> bytes:
    """The KV key of a package uri; InvalidArgumentError when ``uri`` is not one."""
    digest = uri.removeprefix(SCHEME)
    if not uri.startswith(SCHEME) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InvalidArgumentError(f"working_dir must be {SCHEME}<sha256 hex>, got {uri!r}")
    return digest.encode()


def unpack(uri: str, blob: bytes, dest: Path) -> Path:
    """Unpack ``blob`` (checked against ``uri``) into ``dest`` once; returns ``dest``."""
    if SCHEME + hashlib.sha256(blob).hexdigest() != uri:
        raise InvalidArgumentError(f"package {uri} does not match its content")
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        for name in z.namelist():
            parts = PurePosixPath(name).parts
            if name.startswith("/") or ".." in parts or not parts:
                raise InvalidArgumentError(f"package {uri} holds an unsafe path {name!r}")
        z.extractall(tmp)
    (tmp / ".complete").touch()
    try:
        tmp.rename(dest)
    except OSError:  # unpacked meanwhile by another job of the same package
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return dest
