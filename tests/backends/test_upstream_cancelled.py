"""A request cancelled (the client gone) while the sidecar reads an upstream's error answer,
or its health probe, gives its connection back: the pool slot is freed and the socket closed,
so the next request on a one-connection pool is served."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sidecar.backends.base import Call
from sidecar.backends.upstream_openai import OpenAIUpstream
from sidecar.observability.timing import Timing
from sidecar.settings import ProviderSettings
from sidecar.transport import UpstreamClient
from tests.support.raw_upstream import Request, answer, raw_upstream, wait_eof

# An answer whose body never finishes: 100 bytes promised, 9 sent.
STALLED_ERROR = b'HTTP/1.1 500 Internal\r\nContent-Length: 100\r\n\r\n{"error":'
STALLED_PROBE = b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"data":'


def call() -> Call:
    return Call("chat/completions", b"{}", "rid-1", Timing())


@pytest.mark.parametrize("stage", ["error body", "probe"])
async def test_a_cancelled_read_frees_its_pool_slot(stage: str) -> None:
    served = 0

    async def handler(request: Request, writer: asyncio.StreamWriter) -> bool:
        nonlocal served
        served += 1
        if served == 1:
            writer.write(STALLED_ERROR if stage == "error body" else STALLED_PROBE)
            await wait_eof(request.reader)  # until the sidecar drops the connection
            return False
        writer.write(answer(b'{"id":"second"}'))
        return True

    async with raw_upstream(handler) as upstream:
        url = upstream.url + "/v1"
        client = UpstreamClient(url, max_connections=1)
        backend = OpenAIUpstream("stalled", ProviderSettings(base_url=url, max_retries=0,
                                                             max_connections=1),
                                 None, client, 15.0)
        first: Callable[[], Awaitable[object]] = (
            (lambda: backend.complete(call())) if stage == "error body" else backend.probe)
        task = asyncio.ensure_future(first())
        while served == 0 or not upstream.requests:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the head is in; the body is being waited for
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert client.pool.open == 0
        await upstream.wait_ended()  # the upstream saw the connection closed
        async with asyncio.timeout(5):
            assert await backend.complete(call()) == b'{"id":"second"}'
        await client.close()
