"""Bytes of a response that are not its body (a header line, a chunk's extensions, a trailer)
are counted as they arrive, so one line that never ends is refused once it passes the header
limit, not gathered whole by the parser until a timeout."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.transport import Limits, UpstreamClient
from sidecar.transport.errors import ProtocolViolation
from tests.support.raw_upstream import Request, raw_upstream

# What each endless answer starts with; the upstream then sends 4 MiB of one line, and waits.
ENDLESS = {
    "header line": b"HTTP/1.1 200 OK\r\nX-Big: ",
    "trailer": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-T: ",
    "chunk extension": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;ext=",
}
LINE = 4 << 20


def endless(start: bytes, sent: list[int]):  # type: ignore[no-untyped-def]
    async def handler(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(start)
        while sent[0] < LINE:
            writer.write(b"a" * 65536)
            sent[0] += 65536
            await writer.drain()
        await asyncio.sleep(30)  # the line never ends
        return False

    return handler


@pytest.mark.parametrize("where", list(ENDLESS))
async def test_an_endless_line_is_refused_as_it_passes_the_header_limit(where: str) -> None:
    sent = [0]
    async with raw_upstream(endless(ENDLESS[where], sent)) as upstream:
        client = UpstreamClient(upstream.url, limits=Limits(max_header_bytes=16 * 1024))
        started = asyncio.get_running_loop().time()
        with pytest.raises(ProtocolViolation, match="exceed 16384 bytes"):
            response = await client.request("POST", "/", b"", headers_timeout_s=10)
            try:
                while await response.read(idle_s=10):
                    pass
            finally:
                response.close()
        # Refused long before the line (or the timeouts) ended, its connection dropped.
        assert asyncio.get_running_loop().time() - started < 2
        assert sent[0] < LINE
        assert client.pool.open == 0
        await upstream.wait_ended()
        await client.close()


async def test_many_small_chunks_are_not_mistaken_for_endless_framing() -> None:
    pieces = b"".join(b"1\r\n" + bytes([48 + i % 10]) + b"\r\n" for i in range(50_000))
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + pieces + b"0\r\n\r\n"

    async def handler(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        return True

    async with raw_upstream(handler) as upstream:
        client = UpstreamClient(upstream.url, limits=Limits(max_header_bytes=1024))
        response = await client.request("POST", "/", b"", headers_timeout_s=5)
        body = await response.read_all(5, 1 << 20)
        response.release()
        assert len(body) == 50_000 and body[:10] == b"0123456789"
        await client.close()
