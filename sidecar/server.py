"""Running the app: one uvloop event loop, a graceful drain on SIGTERM/SIGINT, SIGHUP that
reloads the whole config (sidecar/reload.py) and never stops the process."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import ssl
from collections.abc import Callable

from aiohttp import web

from sidecar import config
from sidecar.app import create_app
from sidecar.appkeys import BACKENDS, READINESS, SOCKETS
from sidecar.backends.local import LocalBackend
from sidecar.errors import SHUTTING_DOWN
from sidecar.live_app import LiveApp, metrics_listening
from sidecar.observability.logging import LineWriter
from sidecar.reload import Reloads
from sidecar.security.connections import EdgeRunner, c_parser_in_use
from sidecar.security.tls import server_context
from sidecar.service import Notifier, announce_ready, watchdog
from sidecar.settings import Settings

log = logging.getLogger("sidecar")
# After the drain: how long requests just ended get to write their last words, and idle
# keep-alive connections to close. Small, so a stop takes drain_timeout_s and little more.
CLOSE_S = 1.0
# After SIGTERM, connections are still accepted this long (or the drain, if shorter).
ACCEPT_WHILE_DRAINING_S = 2.0


async def serve(settings: Settings, log_writer: LineWriter | None = None,
                reread: Callable[[], Settings] | None = None) -> None:
    """Serve until SIGTERM or SIGINT. `reread` reads the config again (blocking: it is called
    in a thread) when SIGHUP asks for a reload; without it SIGHUP reloads only the TLS files."""
    server = settings.server
    if not c_parser_in_use():
        log.warning("aiohttp's C HTTP parser is not in use; the pure-Python one is slower and "
                    "less strict (is AIOHTTP_NO_EXTENSIONS set?)")
    tls = await asyncio.to_thread(server_context, server) if server.tls_cert else None
    live = LiveApp()
    await live.start(create_app(settings, log_writer))
    runner = EdgeRunner(
        live,
        max_connections=server.max_connections,
        access_log=None,
        # A client that goes away cancels its handler, and with it the upstream request.
        handler_cancellation=True,
        # The drain (drain_timeout_s) is ours, below; aiohttp's own wait comes after it and
        # would wait as long again, twice (for the handler, then for its task).
        shutdown_timeout=CLOSE_S,
        max_body_bytes=server.max_body_bytes,
        # Headers must arrive within this long of a connection opening or going idle.
        keepalive_timeout=server.header_timeout_s,
        max_headers=server.max_headers,
        max_field_size=server.max_header_bytes,
        max_line_size=server.max_header_bytes,
        # After an early answer (413, 408) the rest of a body is read and dropped this long,
        # so the client sees the answer rather than a reset; then the connection closes.
        lingering_time=1.0,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier = Notifier()
    tasks: list[asyncio.Task[None]] = []
    reloads = Reloads(live, runner.in_flight, tls, notifier,
                      reread or functools.partial(config.load, settings.source),
                      log_writer)
    # systemd's reload sends SIGHUP; without a handler it would end the process.
    loop.add_signal_handler(signal.SIGHUP, reloads.hangup)
    try:
        await _listen(runner, settings, tls)
        address = _address(runner, tls is not None)
        log.info(
            "serving",
            extra={"fields": {"address": address,
                              "config": settings.source, "models": sorted(settings.models),
                              "auth": settings.auth.mode}},
        )
        reloads.address = address
        if notifier.enabled:
            tasks.append(asyncio.create_task(
                announce_ready(notifier, lambda: _loading(live.app), reloads.serving()),
                name="notify-ready"))
        if notifier.watchdog_s:
            tasks.append(asyncio.create_task(watchdog(notifier), name="watchdog"))
        async with metrics_listening(live):
            await stop.wait()
            notifier.stopping(f"draining {len(runner.in_flight.tasks)} requests")
            await reloads.close()
            await _drain(live.app, runner, server.drain_timeout_s)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await reloads.close()
        await runner.cleanup()
        notifier.close()
        log.info("stopped")


def _loading(app: web.Application) -> list[str]:
    """The local providers whose model is still on its way (not loaded, and not failed)."""
    return [name for name, backend in app[BACKENDS].items()
            if isinstance(backend, LocalBackend) and not backend.engine.ready
            and not backend.engine.load_error]


async def _listen(runner: web.BaseRunner, settings: Settings, tls: ssl.SSLContext | None
                  ) -> None:
    """Bind the addresses server.host resolved to when the config was checked, not the name
    again: what was judged loopback is what is bound. Port 0 picks one port for them all."""
    port = settings.server.port
    for i, address in enumerate(settings.listen_addresses or [settings.server.host]):
        site = web.TCPSite(runner, address, port, backlog=1024, reuse_address=True,
                           ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            if i == 0:
                raise
            # A name such as localhost may resolve to ::1 on a host without IPv6.
            log.warning("cannot listen on one of the addresses",
                        extra={"fields": {"address": address, "error": exc.strerror}})
            continue
        if port == 0:
            port = runner.addresses[0][1]


async def _drain(app: web.Application, runner: EdgeRunner, grace_s: float) -> None:
    """Say not ready at once, stop accepting connections after a short while, let requests in
    flight finish for `grace_s` (once), then end those still running with a reason: a stream
    ends with an error event, not a silent cut."""
    app[READINESS].draining = True
    in_flight = runner.in_flight
    app[SOCKETS].drain()  # idle WebSockets close now, busy ones after their response
    log.info("stopping: draining requests in flight",
             extra={"fields": {"in_flight": len(in_flight.tasks), "timeout_s": grace_s}})
    # New connections are still taken for a moment: a load balancer that has not yet seen
    # /readyz say 503 gets an answer rather than a refused connection.
    accepting_s = min(ACCEPT_WHILE_DRAINING_S, grace_s)
    if await in_flight.wait_idle(accepting_s):
        return
    for site in list(runner.sites):
        await site.stop()  # the listening sockets close; open connections stay
    log.info("stopping: no longer accepting connections",
             extra={"fields": {"in_flight": len(in_flight.tasks)}})
    if await in_flight.wait_idle(grace_s - accepting_s):
        return
    left = in_flight.cancel(SHUTTING_DOWN)
    log.warning("stopping: ending requests still in flight after the drain",
                extra={"fields": {"requests": len(left)}})
    await asyncio.wait(left, timeout=CLOSE_S)


def _address(runner: web.BaseRunner, tls: bool) -> str:
    scheme = "https" if tls else "http"
    for address in runner.addresses:
        host, port = address[0], address[1]
        return f"{scheme}://{host}:{port}" if ":" not in host else f"{scheme}://[{host}]:{port}"
    return ""


def tune_gc() -> None:
    """Freeze what start-up built and collect young objects less often.

    A proxied request allocates a few hundred short-lived containers; with the default
    threshold (700) the cyclic collector runs every few requests and re-traverses the objects
    of every request in flight, which cost about a tenth of the CPU per request here.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def run(settings: Settings, log_writer: LineWriter | None = None,
        reread: Callable[[], Settings] | None = None) -> None:
    import uvloop

    tune_gc()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings, log_writer, reread))
