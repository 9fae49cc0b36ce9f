"""The application factory: each part is built in a cleanup context of its own, in order (HTTP
session, auth keys, Redis, cache, backends, the gateway, the probe, route sync, model loads),
and torn down in reverse; nothing lives at module level."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Coroutine
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from sidecar.api import (
    admin,
    admin_engines,
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
from sidecar.api.sockets import OpenSockets
from sidecar.appkeys import (
    ACCESS_LOG,
    BACKENDS,
    CACHE,
    CACHE_SECRET,
    GATEWAY,
    HTTP,
    LIMITER,
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
from sidecar.config import metrics_listener
from sidecar.engines.factory import make_engine
from sidecar.gateway import Gateway, Readiness
from sidecar.observability.logging import AccessLog, LineWriter
from sidecar.observability.metrics import Metrics
from sidecar.routing.router import Router
from sidecar.routing.shared import RouteSync
from sidecar.routing.state import RouteState
from sidecar.routing.table import RouteTable
from sidecar.security.jwt import JwksFetcher, Verifier, load_static_keys
from sidecar.security.limits import Limiter
from sidecar.security.tickets import TicketBook
from sidecar.settings import AnthropicProviderSettings, LocalProviderSettings, Settings

log = logging.getLogger("sidecar")


def create_app(settings: Settings, log_writer: LineWriter | None = None) -> web.Application:
    """The app; request lines go to `log_writer` when one is given and logging.requests is on."""
    access_log = AccessLog(log_writer if settings.logging.requests else None)
    verifier = Verifier(settings.auth) if settings.auth.mode == "jwt" else None
    limiter = Limiter(settings.limits)
    counted = Metrics(settings) if settings.metrics.enabled else None
    app = web.Application(
        middlewares=[make_middleware(access_log, Guard(verifier, settings.auth, limiter),
                                     counted)],
        client_max_size=settings.server.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[READINESS] = Readiness()
    app[VERIFIER] = verifier
    app[LIMITER] = limiter
    app[METRICS] = counted
    app[SOCKETS] = OpenSockets()
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
    app.cleanup_ctx.append(_model_loads)
    app.cleanup_ctx.append(_metrics_listener)
    app.on_startup.append(_mark_started)
    app.on_shutdown.append(_mark_draining)
    app[ROUTE_STATE] = RouteState(settings.routing.state_file)
    # Keys are HMACs under a secret nobody else has, so nobody can compute another tenant's
    # key: one shared by the fleet when Redis is shared, otherwise one of this process.
    secret = settings.cache_secret
    app[CACHE_SECRET] = secret.reveal().encode() if secret is not None else os.urandom(32)
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
    session per origin, shared by the providers there."""
    settings = app[SETTINGS]
    sessions: dict[str, aiohttp.ClientSession] = {}
    backends: dict[str, Backend] = {}
    app[BACKENDS] = backends
    try:
        for name, provider in settings.providers.items():
            if isinstance(provider, LocalProviderSettings):
                engine = await asyncio.to_thread(make_engine, provider)
                backends[name] = LocalBackend(name, engine, provider, settings.server.heartbeat_s)
                continue
            url = urlsplit(provider.base_url)
            origin = f"{url.scheme}://{url.netloc}"
            session = sessions.get(origin)
            if session is None:
                connector = aiohttp.TCPConnector(
                    limit=provider.max_connections,
                    limit_per_host=0,
                    ttl_dns_cache=60,
                    enable_cleanup_closed=True,
                )
                # Requests are sent as the client wrote them; the sidecar adds no cookies.
                session = sessions[origin] = aiohttp.ClientSession(
                    connector=connector, cookie_jar=aiohttp.DummyCookieJar())
            if isinstance(provider, AnthropicProviderSettings):
                backends[name] = AnthropicUpstream(name, provider, settings.api_keys.get(name),
                                                   session, settings.server.heartbeat_s)
                continue
            backends[name] = OpenAIUpstream(name, provider, settings.api_keys.get(name),
                                            session, settings.server.heartbeat_s)
        yield
    finally:
        for backend in backends.values():
            await backend.close()
        for session in sessions.values():
            await session.close()


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
                           count_usage=app[METRICS] is not None)
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
                                       app[CACHE_SECRET])
    try:
        async with _running(sync.run(), "route-sync"):
            yield
    finally:
        await sync.close()


async def _model_loads(app: web.Application) -> AsyncIterator[None]:
    """Models load in the background: /healthz answers at once, /readyz once they are in."""
    tasks = [asyncio.create_task(_load(b), name=f"load-{b.name}")
             for b in app[BACKENDS].values() if isinstance(b, LocalBackend)]
    yield
    for task in tasks:
        await _cancelled(task)


async def _metrics_listener(app: web.Application) -> AsyncIterator[None]:
    """metrics.listen: the metrics on a loopback listener of their own, without a token."""
    settings = app[SETTINGS]
    if not settings.metrics.enabled or not settings.metrics.listen:
        yield
        return
    host, port = metrics_listener(settings.metrics.listen, settings.source)
    scraping = web.Application()
    scraping.router.add_get(settings.metrics.path, metrics.scrape_handler(
        app, loopback_listener=True))
    runner = web.AppRunner(scraping, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0]
        # Not "address": that field names the main listener in the `serving` line.
        log.info("serving metrics", extra={"fields": {
            "metrics_url": f"http://{_host(bound[0])}:{bound[1]}{settings.metrics.path}"}})
        yield
    finally:
        await runner.cleanup()


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


@contextlib.asynccontextmanager
async def _running(work: Coroutine[Any, Any, None] | None, name: str) -> AsyncIterator[None]:
    """`work` as a task for as long as the block runs, then cancelled."""
    task = asyncio.create_task(work, name=name) if work is not None else None
    try:
        yield
    finally:
        if task is not None:
            await _cancelled(task)


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _load(backend: LocalBackend) -> None:
    with contextlib.suppress(Exception):  # a failed load is logged, and /readyz says so
        await backend.engine.load(backend.settings.model)


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
