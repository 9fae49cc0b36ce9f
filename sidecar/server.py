"""Running the app: one uvloop event loop, a graceful drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from aiohttp import web

from sidecar.app import create_app
from sidecar.config import Settings
from sidecar.observability.logging import LineWriter
from sidecar.security.connections import EdgeRunner, c_parser_in_use
from sidecar.security.tls import reload_certificate, server_context

log = logging.getLogger("sidecar")


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
        shutdown_timeout=server.shutdown_timeout_s,
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
    if tls is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_certificate, tls, server)
    try:
        site = web.TCPSite(runner, server.host, server.port, backlog=1024, reuse_address=True,
                           ssl_context=tls)
        await site.start()
        log.info(
            "serving",
            extra={"fields": {"address": _address(runner, tls is not None),
                              "config": settings.source, "models": sorted(settings.models),
                              "auth": settings.auth.mode}},
        )
        await stop.wait()
        log.info("stopping: draining requests in flight")
    finally:
        await runner.cleanup()
        log.info("stopped")


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
