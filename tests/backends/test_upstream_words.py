"""What an upstream writes in its headers never reaches the client unscrubbed: a
Content-Encoding the sidecar cannot read is refused without being quoted, so an upstream that
echoes the operator's key there does not hand it to the client."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.backends.base import Call
from sidecar.backends.upstream_openai import OpenAIUpstream
from sidecar.errors import UpstreamError
from sidecar.observability.timing import Timing
from sidecar.settings import ProviderSettings, Secret
from sidecar.transport import UpstreamClient
from tests.support.raw_upstream import Request, raw_upstream

KEY = "sk-live-0123456789abcdefSECRETKEY"


async def test_an_unreadable_content_encoding_is_not_quoted() -> None:
    async def echo_key(request: Request, writer: asyncio.StreamWriter) -> bool:
        key = (request.header("authorization") or "").split(" ")[-1]
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Encoding: {key}\r\n"
                     "Content-Length: 2\r\n\r\n{}".encode())
        return True

    async with raw_upstream(echo_key) as upstream:
        url = upstream.url + "/v1"
        client = UpstreamClient(url)
        backend = OpenAIUpstream("echo", ProviderSettings(base_url=url, max_retries=0),
                                 Secret(KEY), client, 15.0)
        with pytest.raises(UpstreamError) as caught:
            await backend.complete(Call("chat/completions", b"{}", "rid-1", Timing()))
        assert upstream.requests[0].header("authorization") == f"Bearer {KEY}"
        message = str(caught.value)
        assert "Content-Encoding" in message
        assert KEY[:8] not in message and "SECRET" not in message
        assert client.pool.open == 0
        await client.close()
