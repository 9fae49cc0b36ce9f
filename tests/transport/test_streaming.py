"""Streaming bodies: SSE frames handed on as they arrive (a burst in one read, 1 ms-spaced
frames one by one), split into events, and back-pressure when the reader is slower than the
upstream."""

from __future__ import annotations

import asyncio

from sidecar.protocol.sse import EventSplitter
from sidecar.transport import Limits, UpstreamClient
from tests.support.raw_upstream import Request, raw_upstream

SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def frame(i: int) -> bytes:
    return b'data: {"n":%d}\n\n' % i


async def read_events(client: UpstreamClient) -> list[list[bytes]]:
    """The events, grouped by the read that delivered them."""
    response = await client.request("POST", "/", b"", headers_timeout_s=2)
    splitter = EventSplitter()
    reads = []
    while piece := await response.read(2):
        reads.append(splitter.feed(piece))
    response.release()
    return reads


async def test_a_burst_of_frames_arrives_whole_and_in_order() -> None:
    async def burst(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(SSE_HEAD + b"".join(chunk(frame(i)) for i in range(200)) + b"0\r\n\r\n")
        return True

    async with raw_upstream(burst) as upstream:
        client = UpstreamClient(upstream.url)
        reads = await read_events(client)
        events = [event for read in reads for event in read]
        assert events == [b'{"n":%d}' % i for i in range(200)]
        assert client.pool.idle == 1  # read to its end: kept
        await client.close()


async def test_frames_one_millisecond_apart_are_delivered_one_by_one() -> None:
    async def spaced(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(SSE_HEAD)
        for i in range(50):
            writer.write(chunk(frame(i)))
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.write(b"0\r\n\r\n")
        return True

    async with raw_upstream(spaced) as upstream:
        client = UpstreamClient(upstream.url)
        reads = [read for read in await read_events(client) if read]
        assert reads == [[b'{"n":%d}' % i] for i in range(50)]  # none held back, none merged
        await client.close()


async def test_a_slow_reader_pauses_the_socket_instead_of_buffering() -> None:
    total = 16 << 20
    sent = asyncio.Event()

    async def flood(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
        block = b"x" * (1 << 20)
        for _ in range(total >> 20):
            writer.write(block)
            await writer.drain()  # waits while the client is not reading
        sent.set()
        return True

    async with raw_upstream(flood) as upstream:
        limits = Limits(buffer_high=256 * 1024, buffer_low=64 * 1024)
        client = UpstreamClient(upstream.url, limits=limits)
        response = await client.request("POST", "/", b"", headers_timeout_s=2)
        await asyncio.sleep(0.3)  # the reader does not read
        connection = response._connection  # what this test is about: the unread bytes held
        assert connection._buffered <= limits.buffer_high + (1 << 20)
        assert not sent.is_set()  # the upstream is held back by TCP, not by our memory
        received = 0
        while piece := await response.read(5):
            received += len(piece)
        assert received == total and sent.is_set()
        response.release()
        await client.close()
