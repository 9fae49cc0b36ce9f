"""The admin JSON API of the local engines: what is loaded and how busy it is; load another
model, unload, reload, without restarting the process."""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web

from sidecar.api.http import JSON
from sidecar.appkeys import CONTEXT, GATEWAY
from sidecar.backends.local import LocalBackend
from sidecar.engines import models
from sidecar.engines.errors import EngineUnusable
from sidecar.errors import InvalidRequest, ModelNotFound, SidecarError

routes = web.RouteTableDef()
audit = logging.getLogger("sidecar.audit")


class LoadFailed(SidecarError):
    status = 500
    code = "model_load_failed"


def local_backends(app: web.Application) -> dict[str, LocalBackend]:
    if GATEWAY not in app:
        return {}
    return {name: b for name, b in app[GATEWAY].backends.items() if isinstance(b, LocalBackend)}


@routes.get("/admin/api/engines")
async def show_engines(request: web.Request) -> web.Response:
    engines = {name: b.engine.describe() for name, b in local_backends(request.app).items()}
    return web.Response(body=orjson.dumps({"engines": engines}), content_type=JSON)


@routes.post("/admin/api/engines/{name}/{action:load|unload|reload}")
async def change_engine(request: web.Request) -> web.Response:
    name, action = request.match_info["name"], request.match_info["action"]
    backend = local_backends(request.app).get(name)
    if backend is None:
        raise ModelNotFound(f"There is no local provider `{name}`.", param="name",
                            code="engine_not_found")
    engine = backend.engine
    before = engine.model_name or None
    model = before or backend.settings.model
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
        try:
            await asyncio.to_thread(models.check, model)
        except EngineUnusable as exc:
            raise InvalidRequest(f"Cannot load {model}: {exc}.", param="model") from None
    context = request[CONTEXT]
    audit.info("local model change", extra={"fields": {
        "who": context.principal.tenant, "remote": request.remote, "provider": name,
        "action": action, "before": before, "model": model,
        "request_id": context.request_id}})
    if action == "unload":
        await engine.unload()
    else:
        try:
            await engine.load(model)
        except Exception as exc:  # noqa: BLE001 - the operator gets what went wrong
            raise LoadFailed(f"Loading {model} failed: {exc}") from None
    return web.Response(body=orjson.dumps(engine.describe()), content_type=JSON)
