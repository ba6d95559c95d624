"""Tessera: one platform for distributed tasks, compiled models, GPU scheduling and serving.

``import tessera`` is the SDK. Each service lives in ``tessera.<service>`` in a
distribution of its own; the ``__path__`` below lets all of them share this one
package, in regular and editable installs alike.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

from tessera import exceptions  # noqa: E402
from tessera._api import cancel, get, get_actor, init, is_initialized, kill, put, shutdown, wait  # noqa: E402
from tessera._objects import ObjectRef, ObjectStoreClient  # noqa: E402
from tessera._remote import ActorClass, ActorHandle, RemoteFunction, remote  # noqa: E402
from tessera.client import Client, ClusterNotFoundError, Event, connect  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ActorClass", "ActorHandle", "Client", "ClusterNotFoundError", "Event", "ObjectRef", "ObjectStoreClient",
           "RemoteFunction", "__version__", "cancel", "connect", "exceptions", "get", "get_actor", "init",
           "is_initialized", "kill", "put", "remote", "shutdown", "wait"]
