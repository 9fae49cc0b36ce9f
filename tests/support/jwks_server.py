"""An identity provider's JWKS endpoint on loopback: counts fetches, can be taken down."""

from __future__ import annotations

from aiohttp import web

from tests.support.loopback import ThreadedServer


class JwksServer(ThreadedServer):
    def __init__(self, document: bytes) -> None:
        super().__init__()
        self.document = document
        self.up = True
        self.fetches = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    async def _serve(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if not self.up:
            return web.Response(status=503, text="identity provider is down")
        return web.Response(body=self.document, content_type="application/json")

    def start(self) -> None:  # type: ignore[override]
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self._serve)
        super().start(app)
