"""The state-changing functions of the admin surface: live weights, local engines and the
cache. The JSON admin API and the admin page both call these, so a change made either way is
checked, persisted, audited and shared with the fleet in the same way."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from sidecar.appkeys import AUDIT, CACHE, GATEWAY, ROUTE_STATE, ROUTE_SYNC, SETTINGS
from sidecar.backends.local import LocalBackend
from sidecar.engines import models
from sidecar.engines.errors import EngineUnusable
from sidecar.errors import InvalidRequest, ModelNotFound, SidecarError
from sidecar.observability.audit import Actor

__all__ = ["Actor", "LoadFailed", "actor_of", "change_engine", "change_weights",
           "configured_targets", "flush_cache", "local_backends", "restore_configured"]


class LoadFailed(SidecarError):
    status = 500
    code = "model_load_failed"


def actor_of(request: web.Request, who: str, request_id: str) -> Actor:
    return Actor(who, request.remote, request_id)


async def change_weights(app: web.Application, model: object, targets: object,
                         actor: Actor) -> list[dict[str, Any]]:
    """Apply a weight change to a model's targets, all or nothing (RouteTable.update checks
    it), keep it in the state file, audit it and publish it to the fleet. Returns the
    targets as they are now."""
    if not isinstance(model, str):
        raise InvalidRequest("`model` must name a public model.", param="model")
    if not isinstance(targets, list) or not targets:
        raise InvalidRequest("`targets` must be a non-empty list of changes.", param="targets")
    gateway = app[GATEWAY]
    state = app[ROUTE_STATE]
    async with state.lock:
        before, after = gateway.routes.update(model, targets)
        state.changed[model] = after
        await asyncio.to_thread(state.write)
    app[AUDIT].record("routes changed", actor, model, before, after, model=model)
    sync = app[ROUTE_SYNC]
    if sync is not None:  # every sidecar on the same Redis applies it too
        await sync.publish(model, after)
    return after


def configured_targets(app: web.Application, model: str) -> list[dict[str, Any]]:
    """A model's targets as the TOML file sets them, in the form of a weight change."""
    entry = app[SETTINGS].models.get(model)
    if entry is None:
        raise InvalidRequest(f"There is no model `{model}` to change.", param="model")
    return [{"provider": t.provider, "model": t.model or model, "weight": t.weight,
             "fallback_only": t.fallback_only} for t in entry.targets]


async def restore_configured(app: web.Application, model: str,
                             actor: Actor) -> list[dict[str, Any]]:
    """Back to the TOML's weights: a change like any other (persisted, audited, shared)."""
    return await change_weights(app, model, configured_targets(app, model), actor)


def local_backends(app: web.Application) -> dict[str, LocalBackend]:
    if GATEWAY not in app:
        return {}
    return {name: b for name, b in app[GATEWAY].backends.items() if isinstance(b, LocalBackend)}


async def change_engine(app: web.Application, name: str, action: str, asked_model: str | None,
                        actor: Actor) -> dict[str, Any]:
    """Load `asked_model` (a model directory or builtin:NAME), or unload or reload the local
    provider `name`'s model. Returns the engine's description afterwards."""
    if action not in ("load", "unload", "reload"):
        raise InvalidRequest("The action must be load, unload or reload.", param="action")
    backend = local_backends(app).get(name)
    if backend is None:
        raise ModelNotFound(f"There is no local provider `{name[:100]}`.", param="name",
                            code="engine_not_found")
    engine = backend.engine
    before = engine.model_name or None
    model = before or backend.settings.model
    if action == "load":
        if not isinstance(asked_model, str) or not asked_model:
            raise InvalidRequest("`model` must name a model directory or builtin:NAME.",
                                 param="model")
        model = asked_model
        try:
            await asyncio.to_thread(models.check, model)
        except EngineUnusable as exc:
            raise InvalidRequest(f"Cannot load {model}: {exc}.", param="model") from None
    app[AUDIT].record("local model change", actor, name, before,
                      None if action == "unload" else model,
                      provider=name, action=action, model=model)
    if action == "unload":
        await engine.unload()
    else:
        try:
            await engine.load(model)
        except Exception as exc:  # noqa: BLE001 - the operator gets what went wrong
            raise LoadFailed(f"Loading {model} failed: {exc}") from None
    return engine.describe()


# A tenant as tokens name it: bounded, and nothing a log line or a page would misread.
MAX_TENANT_CHARS = 256


async def flush_cache(app: web.Application, tenant: str | None, actor: Actor
                      ) -> dict[str, int | None]:
    """Drop kept answers, all of them or one tenant's, in this process and in Redis (where
    each answer's signed record says whose it is). Returns how many, per tier; None for
    Redis when it was not flushed (none configured, a cluster, or Redis failing)."""
    cache = app[CACHE]
    if cache is None:
        raise InvalidRequest("The cache is off (cache.enabled = false).", param="cache",
                             code="cache_disabled")
    if tenant is not None and (not tenant or len(tenant) > MAX_TENANT_CHARS):
        raise InvalidRequest(f"`tenant` must be 1 to {MAX_TENANT_CHARS} characters.",
                             param="tenant")
    # Redis first: an answer dropped only here would come straight back from there.
    in_redis = await cache.drop_in_redis(tenant)
    dropped: dict[str, int | None] = {"memory": cache.memory.drop(tenant), "redis": in_redis}
    app[AUDIT].record("cache flushed", actor, tenant or "every tenant", None, dropped,
                      tenant=tenant)
    return dropped
