"""An identity provider's JWKS endpoint on loopback: counts fetches, can be taken down."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web


class JwksServer:
    def __init__(self, document: bytes) -> None:
        self.document = document
        self.up = True
        self.fetches = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    async def _serve(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if not self.up:
            return web.Response(status=503, text="identity provider is down")
        return web.Response(body=self.document, content_type="application/json")

    def start(self) -> None:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_get("/.well-known/jwks.json", self._serve)
            runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=main, daemon=True, name="jwks")
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
