"""The admin page's pages and forms: overview, routing, engines, cache, audit. Reading goes
through sidecar/api/admin_views.py; every change through sidecar/api/admin_changes.py, the
functions the JSON admin API calls. A form that does not pass shows the page again with the
error, and nothing changes."""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web

from sidecar.api import admin_views
from sidecar.api.admin_changes import (
    Actor,
    change_engine,
    change_weights,
    flush_cache,
    local_backends,
    restore_configured,
)
from sidecar.api.admin_page import PageHandler, render, see_other
from sidecar.api.admin_page_access import Form, Visit
from sidecar.appkeys import AUDIT, CACHE, CONTEXT, GATEWAY
from sidecar.errors import InvalidRequest, SidecarError

# A weight as the form's text field holds it: a number is far shorter than this.
MAX_FIELD_CHARS = 64
MAX_TARGETS = 256
ACTIONS = ("load", "unload", "reload")


def _actor(request: web.Request, visit: Visit) -> Actor:
    return Actor(visit.session.who, request.remote, request[CONTEXT].request_id)


def _field(form: Form, name: str, *, required: bool = True) -> str:
    value = form.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value) or len(value) > 1024:
        raise InvalidRequest(f"The form's `{name}` field is missing or too long.", param=name)
    return value


async def overview(request: web.Request, visit: Visit, form: Form | None
                   ) -> web.StreamResponse:
    seen = await admin_views.overview(request.app)
    return render(request, "overview.html", visit, title="Overview", view=seen)


async def routing(request: web.Request, visit: Visit, form: Form | None,
                  *, error: str = "", status: int = 200) -> web.StreamResponse:
    seen = await admin_views.overview(request.app)
    notice = "Saved." if request.query.get("saved") == "1" else ""
    return render(request, "routing.html", visit, status, title="Routing", view=seen,
                  error=error, notice=notice)


async def change_routing(request: web.Request, visit: Visit, form: Form | None
                         ) -> web.StreamResponse:
    """One model's form: save its weights, drain one target (weight 0), or go back to the
    TOML's weights."""
    assert form is not None
    try:
        model = _field(form, "model")
        if form.get("action") == "reset":
            await restore_configured(request.app, model, _actor(request, visit))
        else:
            await change_weights(request.app, model, _weights(form),
                                 _actor(request, visit))
    except SidecarError as exc:
        return await routing(request, visit, None, error=exc.message, status=exc.status)
    return see_other("/admin/routing?saved=1")


def _weights(form: Form) -> list[dict[str, Any]]:
    """The targets' rows of the form as a weight change, as PUT /admin/api/routes takes it."""
    count_text = _field(form, "targets")
    if not count_text.isdigit() or not 0 < int(count_text) <= MAX_TARGETS:
        raise InvalidRequest("The form's `targets` count is not a number of targets.",
                             param="targets")
    drain = form.get("drain")
    changes = []
    for i in range(int(count_text)):
        text = _field(form, f"weight_{i}").strip()
        if len(text) > MAX_FIELD_CHARS:
            raise InvalidRequest(f"Weight {i + 1} is too long to be a number.",
                                 param=f"targets[{i}].weight")
        try:
            weight = float(text)
        except ValueError:
            raise InvalidRequest(f"Weight {i + 1} ({text[:MAX_FIELD_CHARS]!r}) is not a number.",
                                 param=f"targets[{i}].weight") from None
        if drain == str(i):
            weight = 0.0
        changes.append({"provider": _field(form, f"provider_{i}"),
                        "model": _field(form, f"model_{i}"),
                        "weight": weight,
                        "fallback_only": form.get(f"fallback_{i}") == "on"})
    return changes


async def engines(request: web.Request, visit: Visit, form: Form | None,
                  *, error: str = "", status: int = 200) -> web.StreamResponse:
    done = request.query.get("done", "")
    notice = f"{done.capitalize()} done." if done in ACTIONS else ""
    return render(request, "engines.html", visit, status, title="Engines",
                  engines=admin_views.engines(request.app), error=error, notice=notice)


async def confirm_engine(request: web.Request, visit: Visit, form: Form | None
                         ) -> web.StreamResponse:
    """The confirm step: what will happen, and the form that does it. Never for a browser
    that came without the page's cookie: that request was not sent by our engines page (a
    link from elsewhere, from a browser that does not say so), so the engines page instead."""
    if visit.opened_now:
        return await engines(request, visit, None, error=(
            "Choose the change on this page, then confirm it."))
    name = request.query.get("name", "")
    action = request.query.get("action", "")
    model = request.query.get("model", "")[:1024]
    if name not in local_backends(request.app) or action not in ACTIONS \
            or (action == "load" and not model):
        return await engines(request, visit, None, status=400, error=(
            "Choose a local provider and an action (and, to load, a model path or "
            "builtin:NAME)."))
    return render(request, "engine_confirm.html", visit, title="Confirm", name=name,
                  action=action, model=model)


async def change_engine_form(request: web.Request, visit: Visit, form: Form | None
                             ) -> web.StreamResponse:
    assert form is not None
    try:
        name, action = _field(form, "name"), _field(form, "action")
        if form.get("confirmed") != "yes":
            raise InvalidRequest("Confirm the change first.", param="confirmed")
        model = _field(form, "model", required=False) or None
        await change_engine(request.app, name, action, model, _actor(request, visit))
    except SidecarError as exc:
        return await engines(request, visit, None, error=exc.message, status=exc.status)
    return see_other(f"/admin/engines?done={action}")


async def cache(request: web.Request, visit: Visit, form: Form | None,
                *, error: str = "", status: int = 200) -> web.StreamResponse:
    dropped, in_redis = request.query.get("dropped", ""), request.query.get("redis", "")
    notice = f"Flushed: {dropped} answers dropped in this process" if dropped.isdigit() else ""
    if notice:
        notice += f", {in_redis} in Redis." if in_redis.isdigit() else "."
    seen = await admin_views.overview(request.app)
    return render(request, "cache.html", visit, status, title="Cache", view=seen,
                  enabled=request.app[CACHE] is not None, error=error, notice=notice)


async def flush(request: web.Request, visit: Visit, form: Form | None) -> web.StreamResponse:
    assert form is not None
    try:
        tenant = _field(form, "tenant", required=False).strip() \
            if form.get("scope") == "tenant" else None
        if tenant == "":
            raise InvalidRequest("Name the tenant whose answers to drop.", param="tenant")
        dropped = await flush_cache(request.app, tenant, _actor(request, visit))
    except SidecarError as exc:
        return await cache(request, visit, None, error=exc.message, status=exc.status)
    in_redis = dropped["redis"]
    return see_other(f"/admin/cache?dropped={dropped['memory']}"
                     + (f"&redis={in_redis}" if in_redis is not None else ""))


async def audit(request: web.Request, visit: Visit, form: Form | None) -> web.StreamResponse:
    return render(request, "audit.html", visit, title="Audit",
                  changes=request.app[AUDIT].newest_first(),
                  routes=request.app[GATEWAY].routes.names())


# "page": a GET that shows; "prepare": a GET whose form is filled from its URL, asked for only
# by this site; "form": a POST that changes state.
PageKind = Literal["page", "prepare", "form"]
PAGES: list[tuple[str, PageHandler, PageKind]] = [
    ("/admin/", overview, "page"),
    ("/admin/routing", routing, "page"),
    ("/admin/routing", change_routing, "form"),
    ("/admin/engines", engines, "page"),
    ("/admin/engines/confirm", confirm_engine, "prepare"),
    ("/admin/engines", change_engine_form, "form"),
    ("/admin/cache", cache, "page"),
    ("/admin/cache", flush, "form"),
    ("/admin/audit", audit, "page"),
]
