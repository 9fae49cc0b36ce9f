"""Running the app: one uvloop event loop, a graceful drain on SIGTERM/SIGINT, SIGHUP that
reloads the certificate (or is only noted) and never stops the process."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl

from aiohttp import web

from sidecar.app import create_app
from sidecar.appkeys import BACKENDS, READINESS, SOCKETS
from sidecar.backends.local import LocalBackend
from sidecar.errors import SHUTTING_DOWN
from sidecar.observability.logging import LineWriter
from sidecar.security.connections import EdgeRunner, InFlight, c_parser_in_use
from sidecar.security.tls import reload_certificate, server_context
from sidecar.service import Notifier, announce_ready, watchdog
from sidecar.settings import ServerSettings, Settings

log = logging.getLogger("sidecar")
# After the drain: how long requests just ended get to write their last words, and idle
# keep-alive connections to close. Small, so a stop takes shutdown_timeout_s and little more.
CLOSE_S = 1.0


async def serve(settings: Settings, log_writer: LineWriter | None = None) -> None:
    server = settings.server
    if not c_parser_in_use():
        log.warning("aiohttp's C HTTP parser is not in use; the pure-Python one is slower and "
                    "less strict (is AIOHTTP_NO_EXTENSIONS set?)")
    tls = await asyncio.to_thread(server_context, server) if server.tls_cert else None
    app = create_app(settings, log_writer)
    runner = EdgeRunner(
        app,
        max_connections=server.max_connections,
        access_log=None,
        # A client that goes away cancels its handler, and with it the upstream request.
        handler_cancellation=True,
        # The drain (shutdown_timeout_s) is ours, below; aiohttp's own wait comes after it and
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
    serving = ""
    # systemd's reload sends SIGHUP; without a handler it would end the process.
    loop.add_signal_handler(signal.SIGHUP, lambda: _hangup(tls, server, notifier, serving))
    tasks: list[asyncio.Task[None]] = []
    try:
        await _listen(runner, settings, tls)
        address = _address(runner, tls is not None)
        log.info(
            "serving",
            extra={"fields": {"address": address,
                              "config": settings.source, "models": sorted(settings.models),
                              "auth": settings.auth.mode}},
        )
        serving = f"serving {len(settings.models)} models on {address}"
        if notifier.enabled:
            tasks.append(asyncio.create_task(
                announce_ready(notifier, lambda: _loading(app), serving), name="notify-ready"))
        if notifier.watchdog_s:
            tasks.append(asyncio.create_task(watchdog(notifier), name="watchdog"))
        await stop.wait()
        notifier.stopping(f"draining {len(runner.in_flight.tasks)} requests")
        await _drain(app, runner.in_flight, server.shutdown_timeout_s)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        notifier.close()
        log.info("stopped")


def _loading(app: web.Application) -> list[str]:
    """The local providers whose model is still on its way (not loaded, and not failed)."""
    return [name for name, backend in app[BACKENDS].items()
            if isinstance(backend, LocalBackend) and not backend.engine.ready
            and not backend.engine.load_error]


async def _listen(runner: web.AppRunner, settings: Settings, tls: ssl.SSLContext | None
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


def _hangup(tls: ssl.SSLContext | None, server: ServerSettings, notifier: Notifier,
            serving: str) -> None:
    notifier.reloading()
    if tls is not None:
        reload_certificate(tls, server)
    else:
        log.info("SIGHUP received: no certificate to reload; carrying on")
    if notifier.is_ready:
        notifier.ready(serving)


async def _drain(app: web.Application, in_flight: InFlight, grace_s: float) -> None:
    """Say not ready at once, let requests in flight finish for `grace_s` (once), then end
    those still running with a reason: a stream ends with an error event, not a silent cut."""
    app[READINESS].draining = True
    app[SOCKETS].drain()  # idle WebSockets close now, busy ones after their response
    log.info("stopping: draining requests in flight",
             extra={"fields": {"in_flight": len(in_flight.tasks), "timeout_s": grace_s}})
    if await in_flight.wait_idle(grace_s):
        return
    left = in_flight.cancel(SHUTTING_DOWN)
    log.warning("stopping: ending requests still in flight after the drain",
                extra={"fields": {"requests": len(left)}})
    await asyncio.wait(left, timeout=CLOSE_S)


def _address(runner: web.AppRunner, tls: bool) -> str:
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


def run(settings: Settings, log_writer: LineWriter | None = None) -> None:
    import uvloop

    tune_gc()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings, log_writer))
