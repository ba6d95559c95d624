"""Typed errors of Tessera's domain code, and their one mapping to gRPC status codes.

Domain modules raise these; the RPC layer (:mod:`tessera.common.rpc`) turns them
into the matching status with the message intact. Anything else that escapes a
servicer becomes INTERNAL, never UNKNOWN.
"""

from __future__ import annotations


class TesseraError(Exception):
    """Base of every Tessera error. ``code`` names the gRPC status it maps to."""

    code: str = "INTERNAL"


class InvalidArgumentError(TesseraError, ValueError):
    """The request is malformed: a wrong id length, a bad name, a missing field."""

    code = "INVALID_ARGUMENT"


class NotFoundError(TesseraError, LookupError):
    """The record does not exist."""

    code = "NOT_FOUND"


class AlreadyExistsError(TesseraError):
    """A create of something that already exists."""

    code = "ALREADY_EXISTS"


class FailedPreconditionError(TesseraError):
    """The system is not in a state that allows the operation (e.g. an illegal state transition)."""

    code = "FAILED_PRECONDITION"


class AbortedError(TesseraError):
    """A concurrent writer won; retrying the whole operation may succeed."""

    code = "ABORTED"


class ResourceExhaustedError(TesseraError):
    """Out of capacity (memory, quota, batch size)."""

    code = "RESOURCE_EXHAUSTED"


class UnavailableError(TesseraError):
    """A dependency (NATS, Redis, a peer) cannot be reached right now; retry later."""

    code = "UNAVAILABLE"


class DeadlineExceededError(TesseraError, TimeoutError):
    """The operation ran out of time."""

    code = "DEADLINE_EXCEEDED"


class DataLossError(TesseraError):
    """Bytes were corrupted or lost in transit (a failed checksum)."""

    code = "DATA_LOSS"


class NoRespondersError(UnavailableError):
    """A NATS request found nobody subscribed to its subject."""


#: The longest status message sent back. gRPC refuses trailers over 16 KiB, so a message that quotes a
#: huge bad input whole would reach the caller as RESOURCE_EXHAUSTED instead of its own status.
MAX_DETAILS_CHARS = 2000


def bounded(details: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """``details`` cut to ``limit`` characters, saying how long it was."""
    if len(details) <= limit:
        return details
    return f"{details[:limit]}... ({len(details)} characters in all)"
