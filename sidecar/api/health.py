"""Liveness and readiness, for systemd, load balancers and orchestrators."""

from __future__ import annotations

import orjson
from aiohttp import web

from sidecar.api.admin_changes import local_backends
from sidecar.api.http import JSON
from sidecar.appkeys import READINESS, VERIFIER
from sidecar.engines.worker import ThreadedEngine

routes = web.RouteTableDef()

_ALIVE = orjson.dumps({"status": "ok"})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return web.Response(body=_ALIVE, content_type=JSON)


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Every part has started, every local model is loaded and making progress, and the
    server is not draining."""
    readiness = request.app[READINESS]
    verifier = request.app[VERIFIER]
    keys_ready = verifier is None or verifier.ready
    engines = {name: _engine_state(b.engine) for name, b in local_backends(request.app).items()}
    engines_ready = all(state == "ready" for state in engines.values())
    extra = {"engines": engines} if engines else {}
    if readiness.ready and keys_ready and engines_ready:
        return web.Response(body=orjson.dumps({"status": "ready", **extra}), content_type=JSON)
    if readiness.draining:
        reason = "draining"
    elif not readiness.ready:
        reason = "starting"
    elif not keys_ready:
        reason = "no signing keys yet"
    else:
        reason = "local model not ready: " + ", ".join(
            f"{name} {state}" for name, state in engines.items() if state != "ready")
    return web.Response(
        body=orjson.dumps({"status": "not_ready", "reason": reason, **extra}),
        status=503,
        content_type=JSON,
        headers={"Retry-After": "1"},
    )


def _engine_state(engine: ThreadedEngine) -> str:
    if engine.hung():
        return f"hung (no token for {engine.stall_s:g}s with jobs active)"
    return engine.state.value
