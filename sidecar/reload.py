"""Swapping the running configuration (SIGHUP, `systemctl reload`).

The whole file is read and checked again off the event loop (TOML, every key, key files, the
TLS pair); then a new application is built from it beside the running one, its parts started
as at start-up (upstream pools, auth keys, Redis, the cache, the route table with the live
weights of the state file applied over the file's, the local engines: kept when their settings
are unchanged). Only when all of that succeeded does it take new requests; requests in flight
finish on the application they started on. Anything wrong on the way leaves the running
configuration serving, and says why in the log and in systemd's STATUS line."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from sidecar.app import create_app
from sidecar.appkeys import LINEAGE, SETTINGS, VERIFIER
from sidecar.config import ConfigError
from sidecar.live_app import LiveApp
from sidecar.observability.logging import LineWriter
from sidecar.security.connections import InFlight
from sidecar.security.tls import reload_certificate, server_context
from sidecar.service import Notifier
from sidecar.settings import Settings

log = logging.getLogger("sidecar")

# Keys read once, when the listeners open: a reload that changes them is applied otherwise
# and says that these wait for a restart.
RESTART_KEYS = (
    ("server", "host"), ("server", "port"), ("server", "max_connections"),
    ("server", "header_timeout_s"), ("server", "max_headers"), ("server", "max_header_bytes"),
    ("metrics", "listen"), ("logging", "level"),
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a reload did, in words for systemd's STATUS line and the log."""

    applied: bool
    reason: str = ""  # why it was refused
    waiting: tuple[str, ...] = ()  # changed keys that take effect at the next restart


async def swap_configuration(live: LiveApp, reread: Callable[[], Settings],
                             in_flight: Collection[asyncio.Task[Any]],
                             tls: ssl.SSLContext | None,
                             log_writer: LineWriter | None = None) -> Outcome:
    """Read the config again with `reread` (in a thread) and, if it is right in every part,
    serve new requests with it; `in_flight` are the requests the running one is serving."""
    running = live.app[SETTINGS]
    try:
        settings = await asyncio.to_thread(reread)
        if bool(settings.server.tls_cert) != (tls is not None):
            raise ConfigError(f"{settings.source}: `server.tls_cert`: turning TLS on or off "
                              "needs a restart")
        if tls is not None:
            # The new pair must load before anything changes (the live context is only
            # touched after the switch, on the loop).
            await asyncio.to_thread(server_context, settings.server)
    except ConfigError as exc:
        return _refused(str(exc))
    except (OSError, ssl.SSLError) as exc:
        return _refused(f"{running.source}: the TLS files do not load: {exc}")
    app = create_app(settings, log_writer, live.app[LINEAGE])
    try:
        build = await live.start_beside(app)
    except Exception as exc:  # noqa: BLE001 - whatever a part raised, the running config stays
        return _refused(f"a part of the new config did not start: {exc}")
    verifier = app[VERIFIER]
    if verifier is not None and not verifier.ready:
        # At start the sidecar waits for its first key set (not ready meanwhile); a reload
        # would instead refuse every token until one came, so the running keys stay.
        await build.cleanup()
        return _refused(f"{settings.source}: `auth.jwks_url`: no key set could be fetched "
                        f"from {settings.auth.jwks_url}")
    live.take_over(build, in_flight)
    if tls is not None:
        reload_certificate(tls, settings.server)
    waiting = tuple(f"{table}.{key}" for table, key in RESTART_KEYS
                    if getattr(getattr(settings, table), key)
                    != getattr(getattr(running, table), key))
    if waiting:
        log.warning("config reloaded; some changed keys take effect at the next restart",
                    extra={"fields": {"keys": list(waiting)}})
    log.info("config reloaded", extra={"fields": {
        "config": settings.source, "models": sorted(settings.models),
        "providers": sorted(settings.providers)}})
    return Outcome(True, waiting=waiting)


def _refused(reason: str) -> Outcome:
    log.error("config reload refused; the running config stays",
              extra={"fields": {"reason": reason}})
    return Outcome(False, reason)


class Reloads:
    """SIGHUP's work: one reload at a time, told to systemd as RELOADING=1 (with the monotonic
    time it asks for) and then READY=1 with what came of it in STATUS."""

    def __init__(self, live: LiveApp, in_flight: InFlight, tls: ssl.SSLContext | None,
                 notifier: Notifier, reread: Callable[[], Settings],
                 log_writer: LineWriter | None) -> None:
        self.address = ""  # the main listener's URL, for the STATUS line
        self._live = live
        self._in_flight = in_flight
        self._tls = tls
        self._notifier = notifier
        self._reread = reread
        self._log_writer = log_writer
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def serving(self) -> str:
        return f"serving {len(self._live.app[SETTINGS].models)} models on {self.address}"

    def hangup(self) -> None:
        """The signal handler: start a reload (after the one running, if any)."""
        if self._closed:  # stopping: the drain is under way
            log.info("SIGHUP while stopping: no reload")
            return
        task = asyncio.create_task(self._reload(), name="reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        async with self._lock:
            self._notifier.reloading()
            outcome = await swap_configuration(self._live, self._reread, self._in_flight.tasks,
                                               self._tls, self._log_writer)
            status = self.serving()
            if not outcome.applied:
                status = f"reload refused ({outcome.reason[:300]}); {status} as before"
            elif outcome.waiting:
                status += f"; {', '.join(outcome.waiting)} changed: applied at the next restart"
            # Before the first READY=1 (models still loading) the start-up's own READY comes
            # later; systemd is not told it is ready early.
            if self._notifier.is_ready:
                self._notifier.ready(status)

    async def close(self) -> None:
        """Stop a reload under way (what it built is torn down again), and take no more."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
