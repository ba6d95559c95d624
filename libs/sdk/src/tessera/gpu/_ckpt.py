"""Checkpoint files: any nest of dicts/lists/tuples holding tensors, written as one flat file.

Layout: ``MAGIC``, the length of the pickled skeleton, the skeleton (the nest with each
tensor replaced by its index, plus dtype/shape/size of each tensor), then the raw bytes of
every tensor, 64-byte aligned. Writing is one sequential pass; reading is one ``readinto``
of the whole file followed by zero-copy tensor views of it, so a node-local ramdisk
(/dev/shm) turns a checkpoint of a ResNet-18 and its optimizer into a few memcpys.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from typing import Any

MAGIC = b"TSGPCK01"
ALIGN = 64


class _T:
    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i

    def __reduce__(self) -> tuple[Any, ...]:
        return _T, (self.i,)


def _strip(obj: Any, tensors: list[Any]) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _T(len(tensors) - 1)
    if isinstance(obj, dict):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strip(v, tensors) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_strip(v, tensors) for v in obj)
    return obj


def _fill(obj: Any, tensors: list[Any]) -> Any:
    if isinstance(obj, _T):
        return tensors[obj.i]
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, tensors) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_fill(v, tensors) for v in obj)
    return obj


def _pad(n: int) -> int:
    return (-n) % ALIGN


def save(path: str | Path, state: Any, *, in_place: bool = False) -> int:
    """Write ``state`` to ``path``; returns the bytes written.

    By default atomically (a temporary file renamed). With ``in_place``, a file of the same
    size already at ``path`` is overwritten where it is: on a ramdisk its pages are already
    there, so a repeated checkpoint (a suspend every time slice) costs one memcpy per byte.
    """
    import torch

    tensors: list[Any] = []
    skeleton = _strip(state, tensors)
    flat = [t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    specs = [(str(t.dtype).removeprefix("torch."), tuple(t.shape), int(f.numel())) for t, f in zip(tensors, flat, strict=True)]
    meta = pickle.dumps((skeleton, specs), protocol=pickle.HIGHEST_PROTOCOL)
    head = MAGIC + struct.pack("<Q", len(meta)) + meta
    head += b"\0" * _pad(len(head))
    total = len(head) + sum(b.numel() + _pad(b.numel()) for b in flat)
    path = Path(path)
    reuse = in_place and path.exists() and path.stat().st_size == total
    target = path if reuse else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(target, "r+b" if reuse else "wb", buffering=0) as f:
        f.write(head)
        for b in flat:
            n = b.numel()
            if n:
                f.write(memoryview(b.numpy()))
            pad = _pad(n)
            if pad:
                f.write(b"\0" * pad)
    if not reuse:
        os.replace(target, path)
    return total


def load_bytes(data: Any) -> Any:
    """The state held by a checkpoint's bytes; tensors are views of ``data`` when it is writable
    (a bytearray, a copy-on-write mmap), else of a copy."""
    import mmap

    import torch

    buf = data if isinstance(data, bytearray | mmap.mmap) else bytearray(data)
    if bytes(buf[:8]) != MAGIC:
        raise ValueError("not a tessera.gpu checkpoint (bad magic)")
    (meta_len,) = struct.unpack_from("<Q", buf, 8)
    skeleton, specs = pickle.loads(bytes(buf[16:16 + meta_len]))
    off = 16 + meta_len
    off += _pad(off)
    tensors = []
    for dtype, shape, nbytes in specs:
        dt = getattr(torch, dtype)
        if nbytes:
            t = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=off).view(dt).reshape(shape)
        else:
            t = torch.empty(shape, dtype=dt)
        tensors.append(t)
        off += nbytes + _pad(nbytes)
    return _fill(skeleton, tensors)


def load_into(path: str | Path, live: Any) -> Any | None:
    """Read a checkpoint straight into the tensors of ``live`` (a state of the same shape, e.g. the
    job's own state_dicts, whose tensors share the parameters' memory): one read, no allocation.

    Returns the checkpoint's state with ``live``'s tensors in it, or None when the shapes differ
    (then use :func:`load`).
    """
    import torch

    live_tensors: list[Any] = []
    _strip(live, live_tensors)
    with open(path, "rb", buffering=0) as f:
        head = f.read(16)
        if head[:8] != MAGIC:
            raise ValueError("not a tessera.gpu checkpoint (bad magic)")
        (meta_len,) = struct.unpack_from("<Q", head, 8)
        skeleton, specs = pickle.loads(f.read(meta_len))
        if len(specs) != len(live_tensors):
            return None
        for (dtype, shape, nbytes), t in zip(specs, live_tensors, strict=True):
            if str(t.dtype).removeprefix("torch.") != dtype or tuple(t.shape) != tuple(shape) or \
                    not t.is_contiguous() or t.device.type != "cpu" or t.numel() * t.element_size() != nbytes:
                return None
        f.seek(16 + meta_len + _pad(16 + meta_len))
        for (_, _, nbytes), t in zip(specs, live_tensors, strict=True):
            if nbytes:
                view = memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())
                got = 0
                while got < nbytes:
                    n = f.readinto(view[got:])
                    if not n:
                        raise ValueError(f"checkpoint {path} is truncated")
                    got += n
            pad = _pad(nbytes)
            if pad:
                f.seek(pad, os.SEEK_CUR)
    return _fill(skeleton, live_tensors)


def load(path: str | Path) -> Any:
    """Read a checkpoint written by :func:`save`.

    The file is mapped copy-on-write, not read: on a ramdisk its tensors are views of the page
    cache until something writes to them (``load_state_dict`` copies them into the model).
    """
    import mmap

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 16:
            raise ValueError(f"checkpoint {path} is truncated")
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    return load_bytes(mm)
