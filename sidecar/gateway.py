"""The parts a request needs on its way through: the route table and the backends."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.backends.base import Backend
from sidecar.routing.router import Router
from sidecar.routing.table import RouteTable


@dataclass(slots=True)
class Gateway:
    routes: RouteTable
    backends: Mapping[str, Backend]
    router: Router


@dataclass(slots=True)
class Readiness:
    """Ready once every part started, and no longer while the server drains."""

    started: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.started and not self.draining
