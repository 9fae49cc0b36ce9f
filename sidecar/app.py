"""The application factory: each part is built in a cleanup context of its own, in order (HTTP
session, auth keys, Redis, cache, backends and their model loads, the gateway, the probe, route
sync), and torn down in reverse; nothing lives at module level. What outlives one build of the
app (a config reload builds the next beside it) comes in a `Lineage`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.api import (
    admin,
    admin_engines,
    admin_page,
    anthropic,
    chat_socket,
    health,
    metrics,
    openai,
    responses,
    responses_socket,
    ws_tickets,
)
from sidecar.api.middleware import Guard, make_middleware
from sidecar.appkeys import (
    ACCESS_LOG,
    AUDIT,
    BACKENDS,
    CACHE,
    CACHE_SECRET,
    GATEWAY,
    HTTP,
    LIMITER,
    LINEAGE,
    METRICS,
    READINESS,
    REDIS,
    ROUTE_STATE,
    ROUTE_SYNC,
    SETTINGS,
    SOCKETS,
    TICKETS,
    VERIFIER,
)
from sidecar.backends.base import Backend
from sidecar.backends.local import LocalBackend
from sidecar.backends.upstream_anthropic import AnthropicUpstream
from sidecar.backends.upstream_openai import OpenAIUpstream
from sidecar.cache.answers import AnswerCache
from sidecar.cache.memory import MemoryCache
from sidecar.cache.redis_tier import RedisTier
from sidecar.cache.response_cache import ResponseCache
from sidecar.gateway import Gateway
from sidecar.lineage import Lineage
from sidecar.observability.logging import AccessLog, LineWriter
from sidecar.routing.router import Router
from sidecar.routing.shared import RouteSync
from sidecar.routing.state import RouteState
from sidecar.routing.table import RouteTable
from sidecar.security.jwt import JwksFetcher, Verifier, load_static_keys
from sidecar.security.tickets import TicketBook
from sidecar.settings import AnthropicProviderSettings, LocalProviderSettings, Settings
from sidecar.transport.clients import UpstreamClients

log = logging.getLogger("sidecar")


def create_app(settings: Settings, log_writer: LineWriter | None = None,
               lineage: Lineage | None = None) -> web.Application:
    """The app; request lines go to `log_writer` when one is given and logging.requests is on.
    `lineage`: what the app running before a reload passes on."""
    lineage = lineage or Lineage()
    access_log = AccessLog(log_writer if settings.logging.requests else None)
    verifier = Verifier(settings.auth) if settings.auth.mode == "jwt" else None
    limiter = lineage.limiter(settings)
    counted = lineage.metrics(settings)
    app = web.Application(
        middlewares=[make_middleware(access_log, Guard(verifier, settings.auth, limiter),
                                     counted)],
        client_max_size=settings.server.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[LINEAGE] = lineage
    app[READINESS] = lineage.readiness
    app[VERIFIER] = verifier
    app[LIMITER] = limiter
    app[METRICS] = counted
    app[AUDIT] = lineage.audit
    app[SOCKETS] = lineage.sockets
    app[ACCESS_LOG] = access_log
    app[TICKETS] = TicketBook(settings.server.ws_ticket_ttl_s)
    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(_auth_keys)
    app.cleanup_ctx.append(_redis)
    app.cleanup_ctx.append(_cache)
    app.cleanup_ctx.append(_backends)
    app.cleanup_ctx.append(_gateway)
    app.cleanup_ctx.append(_probe)
    app.cleanup_ctx.append(_route_sync)
    app.on_startup.append(_mark_started)
    app.on_shutdown.append(_mark_draining)
    app[ROUTE_STATE] = RouteState(settings.routing.state_file)
    # Keys are HMACs under a secret nobody else has, so nobody can compute another tenant's
    # key: one shared by the fleet when Redis is shared, otherwise one of this process.
    secret = settings.cache_secret
    app[CACHE_SECRET] = secret.reveal().encode() if secret is not None \
        else lineage.process_secret
    app.add_routes(openai.routes)
    app.add_routes(anthropic.routes)
    app.add_routes(chat_socket.routes)
    app.add_routes(ws_tickets.routes)
    app.add_routes(responses.routes)
    app.add_routes(responses_socket.routes)
    app.add_routes(admin.routes)
    app.add_routes(admin_engines.routes)
    app.add_routes(health.routes)
    app.add_routes(metrics.routes)
    admin_page.install(app)
    if counted is not None and not settings.metrics.listen:
        app.router.add_get(settings.metrics.path, metrics.scrape_handler(app))
    return app


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    """The sidecar's own outbound calls (a JWKS URL); upstreams have their own pools."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        app[HTTP] = session
        yield


async def _auth_keys(app: web.Application) -> AsyncIterator[None]:
    verifier = app[VERIFIER]
    if verifier is None:
        yield
        return
    auth = app[SETTINGS].auth
    if auth.jwks_url:
        fetcher = JwksFetcher(auth.jwks_url, auth, app[HTTP])
        verifier.use_fetcher(fetcher)
        await fetcher.refresh()  # not ready (readyz) until a key set arrives
        refresher = asyncio.create_task(fetcher.run(), name="jwks-refresh")
        yield
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        return
    verifier.use_keys(await asyncio.to_thread(load_static_keys, auth, app[SETTINGS].jwt_secret))
    yield


async def _redis(app: web.Application) -> AsyncIterator[None]:
    """The Redis a fleet shares, when one is configured: answers, rate limits and weights."""
    settings = app[SETTINGS].cache
    if not settings.redis_url:
        app[REDIS] = None
        yield
        return
    tier = app[REDIS] = RedisTier(settings.redis_url, settings.timeout_ms / 1000,
                                  settings.circuit_s, cluster=settings.cluster)
    app[LIMITER].share(tier)
    await tier.warm()
    yield
    await tier.close()


async def _cache(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS].cache
    app[CACHE] = None
    if settings.enabled:
        app[CACHE] = ResponseCache(MemoryCache(settings.memory_items, settings.ttl_s),
                                   settings.ttl_s, app[REDIS], settings.lock_s,
                                   app[CACHE_SECRET])
    yield


async def _backends(app: web.Application) -> AsyncIterator[None]:
    """A backend per provider: local engines, and upstreams on one pooled keep-alive client
    per origin (sidecar/transport/), shared by the providers there. A local engine comes from
    the lineage: the one the app before a reload ran, when its settings are the same
    (sidecar/lineage.py)."""
    settings = app[SETTINGS]
    engines = app[LINEAGE].engines
    clients = UpstreamClients()
    backends: dict[str, Backend] = {}
    app[BACKENDS] = backends
    try:
        for name, provider in settings.providers.items():
            if isinstance(provider, LocalProviderSettings):
                backends[name] = LocalBackend(name, await engines.acquire(name, provider),
                                              provider, settings.server.heartbeat_s)
                continue
            client = await clients.for_provider(provider, provider.base_url)
            if isinstance(provider, AnthropicProviderSettings):
                backends[name] = AnthropicUpstream(name, provider, settings.api_keys.get(name),
                                                   client, settings.server.heartbeat_s)
                continue
            backends[name] = OpenAIUpstream(name, provider, settings.api_keys.get(name),
                                            client, settings.server.heartbeat_s)
        yield
    finally:
        for backend in backends.values():
            if isinstance(backend, LocalBackend):
                await engines.release(backend.engine)
            else:
                await backend.close()
        await clients.close()


async def _gateway(app: web.Application) -> AsyncIterator[None]:
    """The request path: the route table (with the live weights kept in the state file), the
    router, the token budget and the cache."""
    settings = app[SETTINGS]
    table = RouteTable.from_settings(settings)
    state = app[ROUTE_STATE]
    state.apply(table, await asyncio.to_thread(state.read))
    cache = app[CACHE]
    answers = AnswerCache(cache, settings.cache, app[CACHE_SECRET]) if cache else None
    backends = app[BACKENDS]
    app[GATEWAY] = Gateway(table, backends, Router(settings.routing), app[LIMITER], answers,
                           count_usage=app[METRICS] is not None or settings.logging.requests)
    yield


async def _probe(app: web.Application) -> AsyncIterator[None]:
    interval = app[SETTINGS].routing.probe_interval_s
    async with _running(_probing(app[GATEWAY], interval) if interval else None, "probe"):
        yield


async def _route_sync(app: web.Application) -> AsyncIterator[None]:
    """A fleet on one Redis is steered as one: weight changes reach every sidecar."""
    settings = app[SETTINGS]
    app[ROUTE_SYNC] = None
    if not settings.cache.redis_url:
        yield
        return
    sync = app[ROUTE_SYNC] = RouteSync(settings.cache.redis_url, app[GATEWAY].routes,
                                       app[ROUTE_STATE], settings.cache.timeout_ms / 1000,
                                       app[CACHE_SECRET], app[AUDIT])
    try:
        async with _running(sync.run(), "route-sync"):
            yield
    finally:
        await sync.close()


@contextlib.asynccontextmanager
async def _running(work: Coroutine[Any, Any, None] | None, name: str) -> AsyncIterator[None]:
    """`work` as a task for as long as the block runs, then cancelled."""
    task = asyncio.create_task(work, name=name) if work is not None else None
    try:
        yield
    finally:
        if task is not None:
            await _cancelled(task)


async def _cancelled(task: asyncio.Task[None], within_s: float = 2.0) -> None:
    """Cancel `task` and wait for it, briefly: a task stuck in a library's clean-up (a
    Redis connection that never says goodbye) must not hold a stop or a reload."""
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=within_s)
    if not done:
        log.warning("a background task did not stop when asked; left behind",
                    extra={"fields": {"task": task.get_name(), "waited_s": within_s}})
        return
    with contextlib.suppress(asyncio.CancelledError):
        task.result()


async def _probing(gateway: Gateway, interval: float) -> None:
    """Ask every backend, every `interval`, whether it answers at all; one that does not
    gets no traffic until it does."""
    names = list(gateway.backends)
    down: set[str] = set()
    while True:
        answers = await asyncio.gather(*(gateway.backends[n].probe() for n in names))
        for name, ok in zip(names, answers, strict=True):
            if ok:
                gateway.router.provider_up(name)
                if name in down:
                    down.discard(name)
                    log.info("provider back in rotation: the probe got an answer",
                             extra={"fields": {"provider": name}})
            else:
                gateway.router.provider_down(name, interval * 1.5, "unreachable by probe")
                if name not in down:
                    down.add(name)
                    log.warning("provider out of rotation: the probe got no answer",
                                extra={"fields": {"provider": name}})
        await asyncio.sleep(interval)


async def _mark_started(app: web.Application) -> None:
    app[READINESS].started = True


async def _mark_draining(app: web.Application) -> None:
    app[READINESS].draining = True
    app[SOCKETS].drain()
