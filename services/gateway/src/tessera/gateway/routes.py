"""Where a call through the gateway goes: the replicas the control store lists, and nothing else.

A call names its replica (``host:port`` as registered) in the route header; one that names none goes
to a replica of the service its method belongs to (the control store's own calls to the control
store). Only registered addresses are dialed, so the gateway cannot be used to reach arbitrary hosts
inside the network.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass


class RouteError(LookupError):
    """No replica to send a call to; the message says why."""


@dataclass(frozen=True)
class Replica:
    service: str  # dashed name, e.g. "task-scheduler"
    address: str  # gRPC host:port
    http_address: str = ""


_GRPC_SERVICE = re.compile(r"^/tessera\.([a-z_]+)\.v\d+\.[A-Za-z]+/[A-Za-z]+$")


def service_of(method: str) -> str:
    """The Tessera service a gRPC method belongs to (``/tessera.task_scheduler.v1.X/Y`` → task-scheduler), or ""."""
    m = _GRPC_SERVICE.match(method)
    return m.group(1).replace("_", "-") if m else ""


class RouteTable:
    """The registered replicas, as last listed, plus the control store's own address."""

    def __init__(self, control_store_address: str) -> None:
        self.control_store_address = control_store_address
        self._by_address: dict[str, Replica] = {}
        self._by_service: dict[str, list[Replica]] = {}
        self._turn = itertools.count()

    def update(self, replicas: Iterable[Replica]) -> None:
        by_address: dict[str, Replica] = {}
        by_service: dict[str, list[Replica]] = {}
        for r in replicas:
            by_address[r.address] = r
            by_service.setdefault(r.service, []).append(r)
        self._by_address, self._by_service = by_address, by_service

    def knows(self, address: str) -> bool:
        return address == self.control_store_address or address in self._by_address

    def resolve(self, route: str, method: str) -> str:
        """The address to forward a call to. Raises RouteError (stale table: refresh and try again)."""
        if route:
            if self.knows(route):
                return route
            raise RouteError(f"no replica is registered at {route}")
        service = service_of(method)
        if not service:
            raise RouteError(f"a call to {method} through the gateway must name its replica in the route header")
        if service == "control-store":
            return self.control_store_address
        return self.pick(service).address

    def pick(self, service: str, *, http: bool = False) -> Replica:
        """A replica of ``service`` (one with an HTTP front end when ``http``), in turn."""
        found = [r for r in self._by_service.get(service, []) if r.http_address or not http]
        if not found:
            raise RouteError(f"no {service} replica{' with an HTTP front end' if http else ''} is registered")
        return found[next(self._turn) % len(found)]

    def replicas(self) -> list[Replica]:
        return list(self._by_address.values())
