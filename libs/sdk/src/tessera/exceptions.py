"""Errors raised by the Tessera SDK (Ray's names where Ray has one)."""

from __future__ import annotations


class TesseraSDKError(Exception):
    """Base of the SDK's errors."""


class GetTimeoutError(TesseraSDKError, TimeoutError):
    """``tessera.get`` ran out of time before every object was available."""


class ObjectStoreFullError(TesseraSDKError, MemoryError):
    """The object store has no room even after spilling: pinned objects fill memory and disk."""


class ObjectLostError(TesseraSDKError):
    """No copy of the object is left anywhere."""


__all__ = ["GetTimeoutError", "ObjectLostError", "ObjectStoreFullError", "TesseraSDKError"]
