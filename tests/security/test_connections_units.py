"""The connection layer served in the test's loop on loopback and spoken to with raw bytes: a
431 for oversized headers, a 400 in the OpenAI shape for broken HTTP, an announced oversize body
refused before it is sent, the cap on open connections, and the requests in flight."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import ClassVar

import orjson
import pytest
from aiohttp import web

from sidecar.live_app import LiveApp
from sidecar.security.connections import EdgeRunner, InFlight, c_parser_in_use

LIMIT = 1000


class Served:
    def __init__(self, runner: EdgeRunner, port: int, release: asyncio.Event) -> None:
        self.runner = runner
        self.port = port
        self.release = release

    async def exchange(self, raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        return answer


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    release = asyncio.Event()

    async def hello(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="hello")

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="slow")

    app = web.Application()
    app.router.add_post("/hello", hello)
    app.router.add_get("/hello", hello)
    app.router.add_get("/slow", slow)
    live = LiveApp()
    await live.start(app)
    runner = EdgeRunner(live, max_connections=2, max_body_bytes=LIMIT)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield Served(runner, runner.addresses[0][1], release)
    release.set()
    await runner.cleanup()


def status_and_body(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), orjson.loads(body) if body else {}


def test_the_c_http_parser_is_found_when_aiohttp_has_it() -> None:
    from aiohttp import http_parser
    assert c_parser_in_use() is (http_parser.HttpRequestParser.__module__
                                 == "aiohttp._http_parser")


async def test_an_ordinary_request_is_served(served: Served) -> None:
    answer = await served.exchange(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello")


async def test_a_header_line_too_long_is_431(served: Served) -> None:
    raw = b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    status, body = status_and_body(await served.exchange(raw))
    assert status == 431
    assert body == {"error": {"message": "The request's headers are too large or too many.",
                              "type": "invalid_request_error", "param": None,
                              "code": "request_header_fields_too_large"}}


async def test_too_many_headers_is_431(served: Served) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    status, body = status_and_body(
        await served.exchange(b"GET /hello HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"))
    assert status == 431
    assert body["error"]["code"] == "request_header_fields_too_large"  # type: ignore[index]


async def test_broken_http_is_400_naming_the_parser_error_and_closing(served: Served) -> None:
    answer = await served.exchange(b"GET /hello HTTP/1.1\r\nHost x\r\n\r\n")
    status, body = status_and_body(answer)
    assert status == 400
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"] == "bad_http_request" and error["type"] == "invalid_request_error"
    assert str(error["message"]).startswith("The request is not valid HTTP: ")
    assert "Bad" in str(error["message"])


async def test_an_announced_body_over_the_limit_is_413_before_it_is_sent(
        served: Served) -> None:
    raw = (b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
           b"Expect: 100-Continue\r\n\r\n" % (LIMIT + 1))
    answer = await served.exchange(raw)
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"100 Continue" not in answer
    _, body = status_and_body(answer)
    assert body["error"]["message"] == (  # type: ignore[index]
        f"The request body is larger than the {LIMIT} bytes this server accepts.")
    assert b"Connection: close" in answer


@pytest.mark.parametrize(("length", "expect"), [(LIMIT, b"100-continue"),
                                                (LIMIT + 1, b"something-else")])
async def test_a_body_within_the_limit_or_another_expectation_goes_through(
        served: Served, length: int, expect: bytes) -> None:
    raw = (b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nExpect: %s\r\n"
           b"Connection: close\r\n\r\n" % (length, expect)) + b"a" * length
    answer = await served.exchange(raw)
    assert answer.startswith(b"HTTP/1.1 ") and not answer.startswith(b"HTTP/1.1 413")


async def test_connections_past_the_cap_are_closed_at_once(served: Served) -> None:
    held = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(2)]
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    for _, w in held:
        w.close()
    await asyncio.sleep(0.05)
    answer = await served.exchange(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")


async def test_the_requests_in_flight_are_tracked_until_they_end(served: Served) -> None:
    flight = served.runner.in_flight
    assert await flight.wait_idle(0.01)
    pending = asyncio.create_task(served.exchange(b"GET /slow HTTP/1.1\r\nHost: x\r\n"
                                                  b"Connection: close\r\n\r\n"))
    for _ in range(100):
        if flight.tasks:
            break
        await asyncio.sleep(0.01)
    assert len(flight.tasks) == 1
    assert not await flight.wait_idle(0.05)
    served.release.set()
    assert await flight.wait_idle(5)
    assert (await pending).endswith(b"slow")
    assert flight.tasks == set()


async def test_cancel_ends_the_requests_in_flight_with_the_reason() -> None:
    flight = InFlight()
    reasons: list[str] = []

    async def handler(request: object) -> web.StreamResponse:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError as exc:
            reasons.append(str(exc.args[0]) if exc.args else "")
            raise
        return web.Response()

    tracked = flight.track(handler, LIMIT)  # type: ignore[arg-type]

    class NoExpect:
        headers: ClassVar[dict[str, str]] = {}

    task = asyncio.create_task(tracked(NoExpect()))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert flight.cancel("draining") == {task}
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reasons == ["draining"]
    assert await flight.wait_idle(0.01)
