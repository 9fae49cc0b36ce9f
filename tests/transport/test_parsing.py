"""Strict reading of upstream responses, against a raw loopback server that sends exactly the
bytes each test scripts: bodies by length, chunked and to the end; interim and bodiless
statuses; and every malformed or smuggling-shaped answer refused, its connection closed."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import pytest

from sidecar.transport import Limits, UpstreamClient
from sidecar.transport.errors import (
    BodyBroken,
    HeadersTimeout,
    ProtocolViolation,
    ReadTimeout,
)
from tests.support.raw_upstream import Request, answer, raw_upstream

FIXED = b"User-Agent: test\r\n"


def scripted(*responses: bytes, close: bool = False):  # type: ignore[no-untyped-def]
    """A handler that writes the next scripted response to each request."""
    queue = list(responses)

    async def handler(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(queue.pop(0) if queue else answer())
        return not close

    return handler


async def fetch(client: UpstreamClient, path: str = "/v1/x") -> tuple[int, dict[str, str], bytes]:
    response = await client.request("POST", path, client.header_block({"X-A": "1"}), b"{}",
                                    headers_timeout_s=2)
    try:
        body = await response.read_all(2, 1 << 20)
    except BaseException:
        response.close()
        raise
    response.release()
    return response.status, dict(response.headers), body


async def test_content_length_body_and_keep_alive() -> None:
    async with raw_upstream(scripted(answer(b'{"a":1}'), answer(b'{"b":2}'))) as upstream:
        client = UpstreamClient(upstream.url)
        assert await fetch(client) == (200, {"content-type": "application/json",
                                             "content-length": "7"}, b'{"a":1}')
        assert (await fetch(client))[2] == b'{"b":2}'
        assert upstream.connections == 1  # the second request reused the connection
        request = upstream.requests[0]
        assert request.line == "POST /v1/x HTTP/1.1"
        assert request.header("host") == f"127.0.0.1:{upstream.port}"
        assert request.header("content-length") == "2" and request.body == b"{}"
        await client.close()


async def test_chunked_body_is_joined() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\n{\"a\r\n5\r\n\":12}\r\n0\r\n\r\n")
    async with raw_upstream(scripted(chunked, answer(b"{}"))) as upstream:
        client = UpstreamClient(upstream.url)
        assert (await fetch(client))[2] == b'{"a":12}'
        assert (await fetch(client))[2] == b"{}"
        assert upstream.connections == 1
        await client.close()


async def test_body_to_the_end_of_the_connection_is_read_and_not_reused() -> None:
    until_close = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"eof\":1}"
    async with raw_upstream(scripted(until_close, close=True)) as upstream:
        client = UpstreamClient(upstream.url)
        assert (await fetch(client))[2] == b'{"eof":1}'
        assert (await fetch(client))[2] == b'{"ok":true}'
        assert upstream.connections == 2
        await client.close()


async def test_interim_1xx_answers_are_skipped() -> None:
    interim = (b"HTTP/1.1 100 Continue\r\n\r\n"
               b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" + answer(b"{}"))
    async with raw_upstream(scripted(interim)) as upstream:
        client = UpstreamClient(upstream.url)
        assert await fetch(client) == (200, {"content-type": "application/json",
                                             "content-length": "2"}, b"{}")
        await client.close()


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_have_no_body_even_with_a_length(status: int) -> None:
    bodiless = f"HTTP/1.1 {status} X\r\nContent-Length: 5\r\n\r\n".encode()
    async with raw_upstream(scripted(bodiless, answer(b"{}"))) as upstream:
        client = UpstreamClient(upstream.url)
        assert (await fetch(client))[:1] == (status,) and (await fetch(client))[2] == b"{}"
        assert upstream.connections == 1
        await client.close()


async def test_a_header_value_that_is_not_utf8_is_kept_byte_for_byte() -> None:
    raw = b"HTTP/1.1 200 OK\r\nX-Odd: caf\xe9 \xff\r\nContent-Length: 2\r\n\r\n{}"
    async with raw_upstream(scripted(raw)) as upstream:
        client = UpstreamClient(upstream.url)
        _, headers, body = await fetch(client)
        assert headers["x-odd"].encode("latin-1") == b"caf\xe9 \xff" and body == b"{}"
        await client.close()


MALFORMED = {
    "both lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"3\r\nabc\r\n0\r\n\r\n",
    "two lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
    "chunk size overflow": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"ffffffffffffffffffffff\r\nabc\r\n",
    "negative length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "other transfer coding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "http/2 status line": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "space in a header name": b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
    "upgrade": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    "unknown content coding": b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2"
                              b"\r\n\r\n{}",
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_answers_are_refused_and_the_connection_dropped(name: str) -> None:
    async with raw_upstream(scripted(MALFORMED[name], answer(b"{}"))) as upstream:
        client = UpstreamClient(upstream.url)
        with pytest.raises(ProtocolViolation):
            await fetch(client)
        assert client.pool.open == 0
        await upstream.wait_ended()  # the upstream saw the connection closed
        assert (await fetch(client))[2] == b"{}"  # and the next request has a fresh one
        assert upstream.connections == 2
        await client.close()


async def test_a_chunk_broken_off_mid_body_is_an_error() -> None:
    cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc"
    async with raw_upstream(scripted(cut, close=True)) as upstream:
        client = UpstreamClient(upstream.url)
        with pytest.raises(BodyBroken):
            await fetch(client)
        await client.close()


@pytest.mark.parametrize("flood", ["count", "size", "interim"])
async def test_header_floods_are_refused(flood: str) -> None:
    if flood == "count":
        headers = "".join(f"X-{i}: v\r\n" for i in range(101))
    else:
        headers = "X-Big: " + "v" * (64 * 1024) + "\r\n"
    raw = f"HTTP/1.1 200 OK\r\n{headers}Content-Length: 0\r\n\r\n".encode()
    if flood == "interim":  # 1xx answers without end, then a proper one
        raw = b"HTTP/1.1 100 Continue\r\n\r\n" * 100 + answer(b"{}")
    async with raw_upstream(scripted(raw)) as upstream:
        client = UpstreamClient(upstream.url, limits=Limits())
        with pytest.raises(ProtocolViolation, match=r"headers|1xx"):
            await fetch(client)
        await client.close()


async def test_headers_and_idle_read_timeouts_are_told_apart() -> None:
    async def slow(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.line.startswith("POST /late-head"):
            await asyncio.sleep(0.5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{")
        await asyncio.sleep(0.5)
        return False

    async with raw_upstream(slow) as upstream:
        client = UpstreamClient(upstream.url)
        with pytest.raises(HeadersTimeout):
            await client.request("POST", "/late-head", b"", headers_timeout_s=0.2)
        response = await client.request("POST", "/late-body", b"", headers_timeout_s=1)
        assert await response.read(idle_s=5) == b"{"
        started = asyncio.get_running_loop().time()
        with pytest.raises(ReadTimeout):
            await response.read(idle_s=0.2)
        assert asyncio.get_running_loop().time() - started < 0.4
        response.close()
        await client.close()


async def test_compressed_bodies_are_inflated_in_bounded_pieces() -> None:
    inflated = b'{"pad":"' + b" " * (4 << 20) + b'"}'
    for coding, packed in (("gzip", gzip.compress(inflated)), ("deflate", zlib.compress(inflated))):
        raw = (f"HTTP/1.1 200 OK\r\nContent-Encoding: {coding}\r\n"
               f"Content-Length: {len(packed)}\r\n\r\n").encode() + packed
        async with raw_upstream(scripted(raw)) as upstream:
            client = UpstreamClient(upstream.url)
            response = await client.request("POST", "/", b"", headers_timeout_s=2)
            pieces = []
            while piece := await response.read(2):
                pieces.append(piece)
            assert b"".join(pieces) == inflated
            assert max(map(len, pieces)) <= 64 * 1024  # never the whole inflated body at once
            response.release()
            await client.close()
