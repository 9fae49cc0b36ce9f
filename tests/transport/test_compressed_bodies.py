"""A compressed body that is corrupt or cut short, wherever inflating it meets the damage
(its first bytes, the tail held back between reads, or its end), is a ProtocolViolation and
its connection is dropped; nothing else escapes the transport."""

from __future__ import annotations

import asyncio
import gzip

import pytest

from sidecar.transport import UpstreamClient
from sidecar.transport.errors import ProtocolViolation
from tests.support.raw_upstream import Request, answer, raw_upstream

INFLATED = b"{" + b" " * 1_000_000 + b"}"


def damaged(how: str) -> bytes:
    packed = bytearray(gzip.compress(INFLATED))
    if how == "wrong checksum":
        packed[-8] ^= 0xFF  # the CRC32 in the trailer: found only once all is inflated
    elif how == "corrupt start":
        packed[10] ^= 0xFF  # the first deflate block's header
    else:  # cut short: the trailer and some data never come
        del packed[-20:]
    return bytes(packed)


@pytest.mark.parametrize("how", ["wrong checksum", "corrupt start", "cut short"])
async def test_a_damaged_gzip_body_is_a_protocol_violation(how: str) -> None:
    packed = damaged(how)
    raw = (f"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {len(packed)}"
           "\r\n\r\n").encode() + packed
    bodies = [raw, answer(b"{}")]

    async def handler(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(bodies.pop(0))
        return True

    async with raw_upstream(handler) as upstream:
        client = UpstreamClient(upstream.url)
        response = await client.request("POST", "/", b"", headers_timeout_s=5)
        with pytest.raises(ProtocolViolation, match="compressed body"):
            try:
                await response.read_all(5, 4 << 20)
            finally:
                response.close()
        assert client.pool.open == 0
        await upstream.wait_ended()
        response = await client.request("POST", "/", b"", headers_timeout_s=5)
        assert await response.read_all(5, 1024) == b"{}"  # a fresh connection serves the next
        response.release()
        await client.close()
