"""What outlives one build of the application. A config reload builds a new application beside
the running one (sidecar/reload.py); these parts pass from one build to the next instead of
being built again: the readiness the health checks report, the process's own cache-key secret,
the local engines, which are kept (model loaded, jobs running) as long as their provider's
settings stay the same, and the request limits' counts and the metrics, kept as long as what
they are counted by stays the same."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field

from sidecar.api.sockets import OpenSockets
from sidecar.engines.factory import make_engine
from sidecar.engines.worker import ThreadedEngine
from sidecar.gateway import Readiness
from sidecar.observability.audit import AuditTrail
from sidecar.observability.metrics import Metrics
from sidecar.security.limits import Limiter
from sidecar.settings import LocalProviderSettings, Settings


@dataclass(slots=True)
class _Held:
    provider: str
    settings: LocalProviderSettings
    engine: ThreadedEngine
    users: int = 0
    # The model's first load, in the background: owned here, not by the build that asked
    # first, so a reload while it runs does not cut it short.
    loading: asyncio.Task[None] | None = None


class Engines:
    """The local engines, counted by the builds that use them: a build asks for its
    provider's engine and gets the one already running when the settings are equal, or a new
    one whose model starts loading in the background (/healthz answers at once, /readyz once
    it is in); an engine closes when the last build using it lets it go."""

    def __init__(self) -> None:
        self._held: dict[int, _Held] = {}  # id(engine) -> its holding

    async def acquire(self, provider: str, settings: LocalProviderSettings) -> ThreadedEngine:
        for held in self._held.values():
            if held.provider == provider and held.settings == settings:
                held.users += 1
                return held.engine
        # Imports torch and checks the machine: not on the event loop.
        engine = await asyncio.to_thread(make_engine, settings)
        held = self._held[id(engine)] = _Held(provider, settings, engine, 1)
        held.loading = asyncio.create_task(_load(engine, settings.model),
                                           name=f"load-{provider}")
        return engine

    async def release(self, engine: ThreadedEngine) -> None:
        held = self._held.get(id(engine))
        if held is None:
            return
        held.users -= 1
        if held.users > 0:
            return
        del self._held[id(engine)]
        if held.loading is not None:
            held.loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await held.loading
        await engine.close()


async def _load(engine: ThreadedEngine, model: str) -> None:
    with contextlib.suppress(Exception):  # a failed load is logged, and /readyz says so
        await engine.load(model)


@dataclass(slots=True)
class Lineage:
    readiness: Readiness = field(default_factory=Readiness)
    # Cache keys are HMACs under a secret nobody else has; without a configured one, this
    # process's own, the same across reloads so kept answers stay reachable.
    process_secret: bytes = field(default_factory=lambda: os.urandom(32))
    engines: Engines = field(default_factory=Engines)
    # The admin changes' trail: the page's audit view shows changes made before a reload too.
    audit: AuditTrail = field(default_factory=AuditTrail)
    # The WebSockets open now, whichever build accepted them: a stop closes them all.
    sockets: OpenSockets = field(default_factory=OpenSockets)
    _limiter: Limiter | None = None
    _limiter_redis: str = ""
    _metrics: Metrics | None = None

    def limiter(self, settings: Settings) -> Limiter:
        """The running limiter (its per-tenant counts and requests in flight) while
        [limits] and the Redis it shares them on are unchanged; otherwise a new one."""
        running = self._limiter
        if running is None or running.settings != settings.limits or \
                self._limiter_redis != settings.cache.redis_url:
            running = self._limiter = Limiter(settings.limits)
            self._limiter_redis = settings.cache.redis_url
        return running

    def metrics(self, settings: Settings) -> Metrics | None:
        """The running metrics (counters, histograms, the stats' windows) while the models,
        targets and certificate they are labelled by are unchanged; otherwise new ones, as
        after a restart. None with metrics off."""
        if not settings.metrics.enabled:
            self._metrics = None
            return None
        fresh = Metrics(settings)
        running = self._metrics
        if running is None or (running.models, running.targets, running.tls_cert) != (
                fresh.models, fresh.targets, fresh.tls_cert):
            running = self._metrics = fresh
        return running
