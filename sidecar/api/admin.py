"""The admin JSON API: routes and their live weights, the cache. Needs the admin scope when auth
is on; the changes themselves are sidecar/api/admin_changes.py's."""

from __future__ import annotations

import orjson
from aiohttp import web

from sidecar.api.admin_changes import actor_of, change_weights, flush_cache
from sidecar.api.http import JSON
from sidecar.appkeys import CACHE, CONTEXT, GATEWAY
from sidecar.errors import InvalidRequest
from sidecar.observability.audit import Actor

routes = web.RouteTableDef()


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
    model = change["model"]
    after = await change_weights(request.app, model, change.get("targets"), _actor(request))
    return web.Response(body=orjson.dumps({"model": model, "targets": after}),
                        content_type=JSON)


@routes.get("/admin/api/cache")
async def show_cache(request: web.Request) -> web.Response:
    """Hits, misses and bypasses since start, entries in this process, and Redis's health
    (failures, commands skipped while its circuit was open)."""
    cache = request.app[CACHE]
    body = {"enabled": cache is not None, **(cache.describe() if cache is not None else {})}
    return web.Response(body=orjson.dumps(body), content_type=JSON)


@routes.post("/admin/api/cache/flush")
async def flush(request: web.Request) -> web.Response:
    """Drop kept answers: `{}` for all (Redis's too), `{"tenant": "..."}` for one tenant's
    (this process's). Answers `{"dropped": {"memory": N, "redis": N or null}}`."""
    body = await request.read()
    try:
        asked = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        raise InvalidRequest('The body must be JSON: {} or {"tenant": "..."}.') from None
    if not isinstance(asked, dict) or set(asked) - {"tenant"}:
        raise InvalidRequest('The body must be {} or {"tenant": "..."}.')
    tenant = asked.get("tenant")
    if tenant is not None and not isinstance(tenant, str):
        raise InvalidRequest("`tenant` must be a string.", param="tenant")
    dropped = await flush_cache(request.app, tenant, _actor(request))
    return web.Response(body=orjson.dumps({"dropped": dropped}), content_type=JSON)


def _actor(request: web.Request) -> Actor:
    context = request[CONTEXT]
    return actor_of(request, context.principal.tenant, context.request_id)
