"""The floor for this stack: a bare aiohttp pass-through proxy on uvloop, one pooled client
session, no validation, no routing, no logging. A streaming request's bytes are passed on as
aiohttp's client hands them over."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)


def create(upstream: str) -> web.Application:
    async def session(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[SESSION].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with request.app[SESSION].post(
            upstream + "/chat/completions", data=body,
            headers={"Content-Type": "application/json"},
        ) as response:
            if b'"stream":true' not in body:
                return web.Response(body=await response.read(), status=response.status,
                                    content_type="application/json")
            streamed = web.StreamResponse(status=response.status,
                                          headers={"Content-Type": "text/event-stream"})
            await streamed.prepare(request)
            async for chunk in response.content.iter_any():
                await streamed.write(chunk)
            await streamed.write_eof()
            return streamed

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/chat/completions", proxy)
    return app


if __name__ == "__main__":
    web.run_app(create(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), access_log=None,
                print=None, loop=uvloop.new_event_loop())
