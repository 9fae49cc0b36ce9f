"""The SSE writer on loopback: a fault of ours in the middle of a stream ends it with the
protocol's error event, never with a second response written into the first one's body."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import aiohttp
from aiohttp import web

from sidecar.api.openai_writer import OPENAI_SSE
from sidecar.api.sse_writer import write_sse
from sidecar.appkeys import CONTEXT
from sidecar.exchange import Answer
from sidecar.observability.timing import RequestContext
from sidecar.security.jwt import ANONYMOUS
from tests.support.in_process import serving


async def _broken() -> AsyncGenerator[bytes, None]:
    yield b'{"n":2}'
    raise RuntimeError("a fault of ours")


async def test_a_fault_mid_stream_ends_it_with_an_error_event() -> None:
    contexts: list[RequestContext] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        context = request[CONTEXT] = RequestContext("req_1", ANONYMOUS)
        contexts.append(context)
        return await write_sse(request, Answer(b"", _broken(), b'{"n":1}'), OPENAI_SSE)

    app = web.Application()
    app.router.add_get("/", handler)
    async with serving(app) as url, aiohttp.ClientSession() as session, \
            session.get(url) as reply:
        assert reply.status == 200
        body = await reply.read()  # a chunked body that ends cleanly
    assert body.startswith(b'data: {"n":1}\n\ndata: {"n":2}\n\ndata: {"error":')
    assert b"req_1" in body and b"[DONE]" not in body
    assert b"HTTP/1.1" not in body
    assert contexts[0].record.stream_error == "server_error"
