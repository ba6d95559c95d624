"""The n-gram lookup kernel (``_native/ngrams.c``), compiled with gcc at first use.

The shared library is cached by the hash of its source in ``TESSERA_SERVING_CACHE_DIR``
(default ``~/.cache/tessera/serving``), so each host compiles it once. ctypes releases the
GIL around each call, so featurization of different batches runs in parallel threads.
Without a C compiler :func:`load` returns None and the featurizers use their
pure-Python path (same results, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "_native" / "ngrams.c"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_P = ctypes.c_void_p
_I = ctypes.c_int64


def cache_dir() -> Path:
    d = os.environ.get("TESSERA_SERVING_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "tessera" / "serving"


def _compile(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise FileNotFoundError("no C compiler (gcc) found")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        subprocess.run([cc, "-O3", "-shared", "-fPIC", "-std=c99", "-o", str(tmp_out), str(SOURCE)],
                       check=True, capture_output=True, timeout=120)
        os.replace(tmp_out, out)  # atomic: concurrent replicas never load a half-written file


def load() -> ctypes.CDLL | None:
    """The kernel library, or None when it cannot be built here (logged once)."""
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("TESSERA_SERVING_NO_NATIVE"):
            return None
        digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
        path = cache_dir() / f"ngrams-{digest}.so"
        try:
            if not path.exists():
                _compile(path)
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("n-gram kernel unavailable, featurizing in Python: %s", e)
            return None
        lib.table_build.restype = _P
        lib.table_build.argtypes = [_P, _P, _I]
        lib.table_bytes.restype = _I
        lib.table_bytes.argtypes = [_P]
        lib.table_free.restype = None
        lib.table_free.argtypes = [_P]
        lib.char_ngrams.restype = _I
        lib.char_ngrams.argtypes = [_P, _P, _P, _I, _I, _I, _P, _P, _P, _I, _P, _P, _I]
        lib.word_ngrams.restype = _I
        lib.word_ngrams.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, _P, _P, _P, _I, _P, _P, _I]
        _lib = lib
        return lib
