"""The admin JSON API: routes and their live weights. Needs the admin scope when auth is on."""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web

from sidecar.api.http import JSON
from sidecar.appkeys import CACHE, CONTEXT, GATEWAY, ROUTE_STATE, ROUTE_SYNC
from sidecar.errors import InvalidRequest

routes = web.RouteTableDef()
audit = logging.getLogger("sidecar.audit")


@routes.get("/admin/api/routes")
async def show_routes(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    body = {"models": gateway.routes.to_json(), "health": gateway.router.snapshot()}
    return web.Response(body=orjson.dumps(body), content_type=JSON)


@routes.put("/admin/api/routes")
async def change_routes(request: web.Request) -> web.Response:
    try:
        change = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise InvalidRequest("The body must be JSON: {\"model\": ..., \"targets\": [...]}.") \
            from None
    if not isinstance(change, dict) or not isinstance(change.get("model"), str):
        raise InvalidRequest("`model` must name a public model.", param="model")
    targets = change.get("targets")
    if not isinstance(targets, list) or not targets:
        raise InvalidRequest("`targets` must be a non-empty list of changes.", param="targets")
    gateway = request.app[GATEWAY]
    state = request.app[ROUTE_STATE]
    model = change["model"]
    async with state.lock:
        before, after = gateway.routes.update(model, targets)
        state.changed[model] = after
        await asyncio.to_thread(state.write)
    context = request[CONTEXT]
    audit.info("routes changed", extra={"fields": {
        "who": context.principal.tenant, "remote": request.remote, "model": model,
        "before": before, "after": after, "request_id": context.request_id}})
    sync = request.app[ROUTE_SYNC]
    if sync is not None:  # every sidecar on the same Redis applies it too
        await sync.publish(model, after)
    return web.Response(body=orjson.dumps({"model": model, "targets": after}),
                        content_type=JSON)


@routes.get("/admin/api/cache")
async def show_cache(request: web.Request) -> web.Response:
    """Hits, misses and bypasses since start, entries in this process, and Redis's health
    (failures, commands skipped while its circuit was open)."""
    cache = request.app[CACHE]
    body = {"enabled": cache is not None, **(cache.describe() if cache is not None else {})}
    return web.Response(body=orjson.dumps(body), content_type=JSON)
