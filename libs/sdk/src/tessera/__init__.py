"""Tessera: one platform for distributed tasks, compiled models, GPU scheduling and serving.

``import tessera`` is the SDK. Each service lives in ``tessera.<service>`` in a
distribution of its own; the ``__path__`` below lets all of them share this one
package, in regular and editable installs alike.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

from tessera import exceptions  # noqa: E402
from tessera._objects import ObjectRef, ObjectStoreClient, get, put  # noqa: E402
from tessera.client import Client, ClusterNotFoundError, Event, connect  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Client", "ClusterNotFoundError", "Event", "ObjectRef", "ObjectStoreClient", "__version__", "connect",
           "exceptions", "get", "put"]
