"""The keep-alive pool against raw loopback servers: reuse, the pool's cap, idle expiry, a
peer that closes an idle connection, bytes after a response, and cancellation (before the
headers and mid-body) that aborts the connection at once and leaks nothing."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from sidecar.transport import UpstreamClient
from tests.support.raw_upstream import Request, answer, raw_upstream, wait_eof


async def fetch(client: UpstreamClient, path: str = "/") -> bytes:
    response = await client.request("POST", path, b"", b"{}", headers_timeout_s=2)
    try:
        body = await response.read_all(2, 1 << 20)
    except BaseException:
        response.close()
        raise
    response.release()
    return body


async def ok(request: Request, writer: asyncio.StreamWriter) -> bool:
    writer.write(answer(request.line.encode()))
    return True


async def test_a_connection_the_peer_closed_while_idle_is_replaced_without_error() -> None:
    async def answer_then_hang_up(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer())
        await writer.drain()
        await asyncio.sleep(0.05)
        return False  # keep-alive was offered, but the server closes the connection

    async with raw_upstream(answer_then_hang_up) as upstream:
        client = UpstreamClient(upstream.url)
        assert await fetch(client) == b'{"ok":true}'
        await upstream.wait_ended()
        await asyncio.sleep(0.01)
        assert await fetch(client) == b'{"ok":true}'
        assert upstream.connections == 2
        await client.close()


async def test_a_kept_alive_connection_closed_as_the_request_went_out_is_retried_once() -> None:
    async def only_one_answer_per_connection(request: Request,
                                             writer: asyncio.StreamWriter) -> bool:
        if upstream.requests.count(request) and len(upstream.requests) % 2 == 0:
            return False  # the race: the server closes instead of answering the second one
        writer.write(answer())
        return True

    async with raw_upstream(only_one_answer_per_connection) as upstream:
        client = UpstreamClient(upstream.url)
        assert await fetch(client) == b'{"ok":true}'
        assert await fetch(client) == b'{"ok":true}'
        assert upstream.connections == 2 and len(upstream.requests) == 3
        await client.close()


@pytest.mark.parametrize("delay_s", [0, 0.05])
async def test_bytes_after_a_response_poison_its_connection(delay_s: float) -> None:
    async def answer_and_more(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer())
        if delay_s:
            await writer.drain()
            await asyncio.sleep(delay_s)
        writer.write(answer(b'{"smuggled":true}'))  # a response nobody asked for
        return True

    async with raw_upstream(answer_and_more) as upstream:
        client = UpstreamClient(upstream.url)
        assert await fetch(client) == b'{"ok":true}'
        await asyncio.sleep(delay_s + 0.02)
        assert await fetch(client) == b'{"ok":true}'  # never the smuggled answer
        assert upstream.connections == 2
        await client.close()


async def test_the_pool_caps_connections_and_queues_the_rest() -> None:
    async def slow(request: Request, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)
        writer.write(answer())
        return True

    async with raw_upstream(slow) as upstream:
        client = UpstreamClient(upstream.url, max_connections=2)
        bodies = await asyncio.gather(*(fetch(client) for _ in range(8)))
        assert bodies == [b'{"ok":true}'] * 8
        assert upstream.connections == 2
        assert client.pool.open == 2 and client.pool.idle == 2
        await client.close()


async def test_idle_connections_are_closed_after_keepalive() -> None:
    async with raw_upstream(ok) as upstream:
        client = UpstreamClient(upstream.url, idle_s=0.1)
        await asyncio.gather(fetch(client), fetch(client))
        assert client.pool.idle == 2
        await upstream.wait_ended(2, within_s=1)
        assert client.pool.open == 0 and client.pool.idle == 0
        await client.close()


async def test_cancel_before_the_headers_is_seen_by_the_upstream_within_10_ms() -> None:
    eof_seen: list[float] = []

    async def never_answer(request: Request, writer: asyncio.StreamWriter) -> bool:
        eof_seen.append(await wait_eof(request.reader))
        return False

    async with raw_upstream(never_answer) as upstream:
        client = UpstreamClient(upstream.url)
        task = asyncio.create_task(fetch(client))
        while not upstream.requests:
            await asyncio.sleep(0.001)
        cancelled = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await upstream.wait_ended()
        seen = eof_seen[0]
        assert seen - cancelled < 0.010, f"the upstream saw the end {seen - cancelled:.4f}s later"
        assert client.pool.open == 0
        await client.close()


async def test_cancel_mid_body_is_seen_by_the_upstream_within_10_ms() -> None:
    eof_seen: list[float] = []

    async def trickle(request: Request, writer: asyncio.StreamWriter) -> bool:
        eof = asyncio.create_task(wait_eof(request.reader))
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while not eof.done():
            writer.write(b"2\r\n{}\r\n")
            await asyncio.sleep(0.005)
        eof_seen.append(eof.result())
        return False

    async with raw_upstream(trickle) as upstream:
        client = UpstreamClient(upstream.url)

        async def read_forever() -> None:
            response = await client.request("POST", "/", b"", headers_timeout_s=2)
            try:
                while await response.read(2):
                    pass
            finally:
                response.close()

        task = asyncio.create_task(read_forever())
        await asyncio.sleep(0.05)
        cancelled = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await upstream.wait_ended()
        seen = eof_seen[0]
        assert seen - cancelled < 0.010, f"the upstream saw the end {seen - cancelled:.4f}s later"
        assert client.pool.open == 0
        await client.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_two_thousand_cancelled_requests_leave_fds_and_memory_where_they_were() -> None:
    async def slow_stream(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.line.startswith("POST /mid"):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n")
        await wait_eof(request.reader)  # until the client leaves; then this side closes too
        return False

    async with raw_upstream(slow_stream) as upstream:
        client = UpstreamClient(upstream.url)

        async def one(path: str) -> None:
            response = await client.request("POST", path, b"", b"{}", headers_timeout_s=30)
            try:
                while await response.read(30):
                    pass
            finally:
                response.close()

        async def batch(count: int) -> None:
            tasks = [asyncio.create_task(one("/mid" if i % 2 else "/head")) for i in range(count)]
            await asyncio.sleep(0.05)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        for _ in range(2):  # warm up allocators and the server
            await batch(100)
        await upstream.wait_ended(200, within_s=10)
        await asyncio.sleep(0.05)
        fds, rss = open_fds(), rss_bytes()
        for _ in range(20):
            await batch(100)
        await upstream.wait_ended(2200, within_s=10)
        await asyncio.sleep(0.05)
        assert client.pool.open == 0
        assert open_fds() - fds <= 2, f"{open_fds() - fds} more descriptors open"
        assert rss_bytes() - rss < 8 << 20, f"RSS grew by {(rss_bytes() - rss) >> 10} KiB"
        assert upstream.connections == 2200
        await client.close()
