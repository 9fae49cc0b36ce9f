"""A real aiohttp server on loopback, run in a thread with its own event loop, for the fake
services the tests talk to (an upstream provider, an identity provider)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web


class ThreadedServer:
    def __init__(self) -> None:
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, app: web.Application, **runner_args: Any) -> None:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            runner = web.AppRunner(app, access_log=None, **runner_args)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
            self.port = runner.addresses[0][1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=main, daemon=True, name="loopback-server")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the loopback server did not start")

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
