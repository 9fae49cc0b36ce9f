"""The typed keys under which the application keeps its parts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from sidecar.gateway import Gateway, Readiness

from sidecar.config import Settings
from sidecar.observability.timing import Timing

SETTINGS = web.AppKey("settings", Settings)
GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")

# Per-request values set by the edge middleware.
REQUEST_ID = web.RequestKey("request_id", str)
TIMING = web.RequestKey("timing", Timing)
LOG_FIELDS: web.RequestKey[dict[str, object]] = web.RequestKey("log_fields")
