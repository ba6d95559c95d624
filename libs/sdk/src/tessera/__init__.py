"""Tessera: one platform for distributed tasks, compiled models, GPU scheduling and serving.

``import tessera`` is the SDK. Each service lives in ``tessera.<service>`` in a
distribution of its own; the ``__path__`` below lets all of them share this one
package, in regular and editable installs alike.

The SDK's names are loaded on first use (PEP 562), so a process that imports
only ``tessera.common`` or a service (every service process does) does not pay
for the client, the object store client and numpy.
"""

from __future__ import annotations

from importlib import import_module
from pkgutil import extend_path
from typing import TYPE_CHECKING, Any

__path__ = extend_path(__path__, __name__)

if TYPE_CHECKING:
    import tessera.internal as internal
    import tessera.util as util
    from tessera import exceptions
    from tessera._api import (
        available_resources,
        cancel,
        cluster_resources,
        get,
        get_actor,
        get_gpu_ids,
        get_runtime_context,
        init,
        is_initialized,
        kill,
        nodes,
        put,
        shutdown,
        wait,
    )
    from tessera._generators import DynamicObjectRefGenerator, ObjectRefGenerator
    from tessera._remote import ActorClass, ActorHandle, RemoteFunction, method, remote
    from tessera._timeline import timeline
    from tessera.client import Client, ClusterNotFoundError, Event, connect
    from tessera.client.objects import ObjectRef, ObjectStoreClient

__version__ = "0.1.0"

#: Where each public name lives.
_LAZY = {
    "exceptions": "tessera.exceptions",
    "internal": "tessera.internal",
    "util": "tessera.util",
    **dict.fromkeys(["available_resources", "cancel", "cluster_resources", "get", "get_actor", "get_gpu_ids",
                     "get_runtime_context", "init", "is_initialized", "kill", "nodes", "put", "shutdown", "wait"],
                    "tessera._api"),
    **dict.fromkeys(["ObjectRef", "ObjectStoreClient"], "tessera.client.objects"),
    **dict.fromkeys(["DynamicObjectRefGenerator", "ObjectRefGenerator"], "tessera._generators"),
    "timeline": "tessera._timeline",
    **dict.fromkeys(["ActorClass", "ActorHandle", "RemoteFunction", "method", "remote"], "tessera._remote"),
    **dict.fromkeys(["Client", "ClusterNotFoundError", "Event", "connect"], "tessera.client"),
}

__all__ = ["ActorClass", "ActorHandle", "Client", "ClusterNotFoundError", "DynamicObjectRefGenerator", "Event",
           "ObjectRef", "ObjectRefGenerator", "ObjectStoreClient", "RemoteFunction", "__version__", "available_resources", "cancel", "cluster_resources", "connect",
           "exceptions", "get", "get_actor", "get_gpu_ids", "get_runtime_context", "init", "internal",
           "is_initialized", "kill", "method", "nodes", "put", "remote", "shutdown", "timeline", "util", "wait"]


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'tessera' has no attribute {name!r}")
    module = import_module(where)
    value = module if name in ("exceptions", "internal", "util") else getattr(module, name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
