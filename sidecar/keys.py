"""The typed keys under which the application keeps its parts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from sidecar.gateway import Gateway, Readiness

from sidecar.config import Settings
from sidecar.observability.timing import RequestContext

SETTINGS = web.AppKey("settings", Settings)
GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")

# Per-request state set by the edge middleware.
CONTEXT = web.RequestKey("context", RequestContext)
