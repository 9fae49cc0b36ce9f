"""An upstream that closes the connection after part of its answer's head has arrived has seen
the request: that is a broken answer, never sent again, unlike a connection closed before any
byte of an answer (which a fresh connection may retry)."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.backends.base import Call
from sidecar.backends.upstream_openai import OpenAIUpstream
from sidecar.errors import UpstreamError, UpstreamUnreachable
from sidecar.observability.timing import Timing
from sidecar.settings import ProviderSettings
from sidecar.transport import UpstreamClient
from sidecar.transport.errors import HeadBroken
from tests.support.raw_upstream import Request, answer, raw_upstream

PARTIAL = b"HTTP/1.1 200 OK\r\nContent-"


def first_then(second: bytes):  # type: ignore[no-untyped-def]
    """Each connection's first request gets a whole answer and is kept alive; its second gets
    `second`, and the connection is closed."""
    answered: list[asyncio.StreamReader | None] = []

    async def handler(request: Request, writer: asyncio.StreamWriter) -> bool:
        if not any(reader is request.reader for reader in answered):
            answered.append(request.reader)
            writer.write(answer(b'{"n":%d}' % len(answered)))
            return True
        writer.write(second)
        return False

    return handler


async def test_a_reused_connection_closed_before_any_answer_byte_is_retried() -> None:
    async with raw_upstream(first_then(b"")) as upstream:
        client = UpstreamClient(upstream.url)
        response = await client.request("POST", "/", b"", headers_timeout_s=5)
        assert await response.read_all(5, 1024) == b'{"n":1}'
        response.release()
        response = await client.request("POST", "/", b"", headers_timeout_s=5)
        assert await response.read_all(5, 1024) == b'{"n":2}'  # from a fresh connection
        response.release()
        assert len(upstream.requests) == 3 and upstream.connections == 2
        await client.close()


async def test_a_reused_connection_closed_mid_head_is_not_retried() -> None:
    async with raw_upstream(first_then(PARTIAL)) as upstream:
        client = UpstreamClient(upstream.url)
        response = await client.request("POST", "/", b"", headers_timeout_s=5)
        assert await response.read_all(5, 1024) == b'{"n":1}'
        response.release()
        with pytest.raises(HeadBroken):
            await client.request("POST", "/", b"", headers_timeout_s=5)
        assert len(upstream.requests) == 2 and upstream.connections == 1
        await client.close()


async def test_a_backend_does_not_resend_a_request_whose_answer_began() -> None:
    async def partial(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(PARTIAL)
        return False

    async with raw_upstream(partial) as upstream:
        url = upstream.url + "/v1"
        backend = OpenAIUpstream("partial", ProviderSettings(base_url=url, max_retries=3),
                                 None, UpstreamClient(url), 15.0)
        with pytest.raises(UpstreamError) as caught:
            await backend.complete(Call("chat/completions", b"{}", "rid-1", Timing()))
        assert not isinstance(caught.value, UpstreamUnreachable)
        assert len(upstream.requests) == 1
