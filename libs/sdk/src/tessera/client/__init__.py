"""The client of a running Tessera cluster.

>>> import tessera
>>> c = tessera.connect()              # the cluster `tessera up` started, or TESSERA_ADDRESS
>>> c.kv_put("demo", b"greeting", b"hello")
>>> c.kv_get("demo", b"greeting")
b'hello'
>>> for event in c.watch("kv", namespace="demo", timeout=5): ...
"""

from tessera.client._client import Client, Event, connect
from tessera.client._discovery import ClusterInfo, ClusterNotFoundError, find_cluster

__all__ = ["Client", "ClusterInfo", "ClusterNotFoundError", "Event", "connect", "find_cluster"]
