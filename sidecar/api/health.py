"""Liveness and readiness, for systemd, load balancers and orchestrators."""

from __future__ import annotations

import orjson
from aiohttp import web

from sidecar.api.http import JSON
from sidecar.keys import READINESS, VERIFIER

routes = web.RouteTableDef()

_ALIVE = orjson.dumps({"status": "ok"})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return web.Response(body=_ALIVE, content_type=JSON)


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Every part has started and the server is not draining."""
    readiness = request.app[READINESS]
    verifier = request.app[VERIFIER]
    keys_ready = verifier is None or verifier.ready
    if readiness.ready and keys_ready:
        return web.Response(body=orjson.dumps({"status": "ready"}), content_type=JSON)
    if readiness.draining:
        reason = "draining"
    elif not readiness.ready:
        reason = "starting"
    else:
        reason = "no signing keys yet"
    return web.Response(
        body=orjson.dumps({"status": "not_ready", "reason": reason}),
        status=503,
        content_type=JSON,
        headers={"Retry-After": "1"},
    )
