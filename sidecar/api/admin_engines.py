"""The admin JSON API of the local engines: what is loaded and how busy it is; load another
model, unload, reload, without restarting the process (sidecar/api/admin_changes.py makes
the change)."""

from __future__ import annotations

import orjson
from aiohttp import web

from sidecar.api.admin_changes import actor_of, change_engine, local_backends
from sidecar.api.http import JSON
from sidecar.appkeys import CONTEXT
from sidecar.errors import InvalidRequest

routes = web.RouteTableDef()


@routes.get("/admin/api/engines")
async def show_engines(request: web.Request) -> web.Response:
    engines = {name: b.engine.describe() for name, b in local_backends(request.app).items()}
    return web.Response(body=orjson.dumps({"engines": engines}), content_type=JSON)


@routes.post("/admin/api/engines/{name}/{action:load|unload|reload}")
async def engine_action(request: web.Request) -> web.Response:
    name, action = request.match_info["name"], request.match_info["action"]
    model = None
    if action == "load":
        body = await request.read()
        try:
            change = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            raise InvalidRequest('The body must be JSON: {"model": "..."}.') from None
        if not isinstance(change, dict) or not isinstance(change.get("model"), str) \
                or not change["model"]:
            raise InvalidRequest("`model` must name a model directory or builtin:NAME.",
                                 param="model")
        model = change["model"]
    context = request[CONTEXT]
    actor = actor_of(request, context.principal.tenant, context.request_id)
    described = await change_engine(request.app, name, action, model, actor)
    return web.Response(body=orjson.dumps(described), content_type=JSON)
