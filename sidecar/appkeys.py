"""The typed keys under which the application keeps its parts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from sidecar.api.admin_page import AdminPage
    from sidecar.api.sockets import OpenSockets
    from sidecar.backends.base import Backend
    from sidecar.gateway import Gateway, Readiness
    from sidecar.lineage import Lineage
    from sidecar.routing.shared import RouteSync

from sidecar.cache.redis_tier import RedisTier
from sidecar.cache.response_cache import ResponseCache
from sidecar.observability.audit import AuditTrail
from sidecar.observability.logging import AccessLog
from sidecar.observability.metrics import Metrics
from sidecar.observability.timing import RequestContext
from sidecar.routing.state import RouteState
from sidecar.security.jwt import Verifier
from sidecar.security.limits import Limiter
from sidecar.security.tickets import TicketBook
from sidecar.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
HTTP = web.AppKey("http", aiohttp.ClientSession)  # for the sidecar's own calls (a JWKS URL)
VERIFIER: web.AppKey[Verifier | None] = web.AppKey("verifier")
LIMITER = web.AppKey("limiter", Limiter)
ROUTE_STATE = web.AppKey("route_state", RouteState)
CACHE: web.AppKey[ResponseCache | None] = web.AppKey("cache")
CACHE_SECRET = web.AppKey("cache_secret", bytes)
REDIS: web.AppKey[RedisTier | None] = web.AppKey("redis")
BACKENDS: web.AppKey[dict[str, Backend]] = web.AppKey("backends")
GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
# What passes from one build of the app to the next when the config is reloaded.
LINEAGE: web.AppKey[Lineage] = web.AppKey("lineage")
ROUTE_SYNC: web.AppKey[RouteSync | None] = web.AppKey("route_sync")
SOCKETS: web.AppKey[OpenSockets] = web.AppKey("sockets")  # the open WebSockets
TICKETS = web.AppKey("tickets", TicketBook)  # WebSocket tickets for browsers
# The request log, for what is answered outside the edge middleware (a WebSocket's responses).
ACCESS_LOG = web.AppKey("access_log", AccessLog)
METRICS: web.AppKey[Metrics | None] = web.AppKey("metrics")  # None when metrics.enabled is off
AUDIT = web.AppKey("audit", AuditTrail)  # the last changes made while serving
ADMIN_PAGE: web.AppKey[AdminPage] = web.AppKey("admin_page")  # when admin_page.enabled

# Per-request state set by the edge middleware.
CONTEXT = web.RequestKey("context", RequestContext)
