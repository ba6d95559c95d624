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


class ObjectFreedError(ObjectLostError):
    """The object was freed (``tessera.internal.free``, or its last reference went): it cannot be read."""


class OwnerDiedError(ObjectFreedError):
    """The process that owned the object exited or died, and the object went with it."""


class TaskError(TesseraSDKError):
    """A task raised. ``get`` raises an instance that is also of the original exception's type where possible.

    Attributes:
        cause: the original exception, when it could be carried back.
        traceback_str: the remote traceback.
        function_name: the task that raised.
    """

    def __init__(self, message: str, *, cause: BaseException | None = None, traceback_str: str = "",
                 function_name: str = "") -> None:
        super().__init__(message)
        self.cause = cause
        self.traceback_str = traceback_str
        self.function_name = function_name

    def __str__(self) -> str:
        text = str(self.args[0]) if self.args else ""
        return f"{text}\n\n{self.traceback_str}" if self.traceback_str else text


class WorkerCrashedError(TesseraSDKError):
    """The worker process running a task died, and the task had no retries left."""


class ActorDiedError(TesseraSDKError):
    """The actor is dead: killed, its constructor raised, or its process died with no restarts left."""


class TaskCancelledError(TesseraSDKError):
    """The task was cancelled with ``tessera.cancel``."""


class TaskUnschedulableError(TesseraSDKError):
    """No node in the cluster has the resources the task asks for."""


class RuntimeEnvSetupError(TesseraSDKError):
    """The worker could not set up the task's or actor's runtime_env (e.g. its packages could not be read)."""


__all__ = ["ActorDiedError", "GetTimeoutError", "ObjectFreedError", "ObjectLostError", "ObjectStoreFullError",
           "OwnerDiedError", "RuntimeEnvSetupError", "TaskCancelledError", "TaskError", "TaskUnschedulableError",
           "TesseraSDKError", "WorkerCrashedError"]
