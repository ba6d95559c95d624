"""Low-level calls most programs never need (Ray's ``ray.internal``).

>>> tessera.internal.free([ref])   # every copy goes now; a later get fails with ObjectFreedError
"""

from tessera._api import free

__all__ = ["free"]
