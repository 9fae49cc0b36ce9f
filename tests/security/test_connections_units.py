"""The connection layer served in the test's loop on loopback and spoken to with raw bytes: a
431 for oversized headers, a 400 in the OpenAI shape for broken HTTP, an announced oversize body
refused before it is sent, the cap on open connections, and the requests in flight."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import orjson
import pytest
from aiohttp import http_exceptions, web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from sidecar.live_app import LiveApp
from sidecar.security.connections import EdgeRunner, EdgeServer, InFlight, c_parser_in_use

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


@contextlib.asynccontextmanager
async def serving(**kwargs: Any) -> AsyncIterator[Served]:
    release = asyncio.Event()

    async def hello(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="hello")

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="slow")

    async def who(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.match_info['name']} {request.app is app}")

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("a bug in a handler")

    app = web.Application()
    app.router.add_post("/hello", hello)
    app.router.add_get("/hello", hello)
    app.router.add_get("/slow", slow)
    app.router.add_get("/who/{name}", who)
    app.router.add_get("/boom", boom)
    live = LiveApp()
    await live.start(app)
    runner = EdgeRunner(live, max_connections=2, max_body_bytes=LIMIT, **kwargs)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield Served(runner, runner.addresses[0][1], release)
    release.set()
    await runner.cleanup()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serving() as instance:
        yield instance


def edge_server(served: Served) -> EdgeServer:
    server = served.runner.server
    assert isinstance(server, EdgeServer)
    return server


async def until(check: Any, seconds: float = 2.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)


def status_and_body(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), orjson.loads(body) if body else {}


def test_the_c_http_parser_is_found_when_aiohttp_has_it() -> None:
    from aiohttp import http_parser
    assert c_parser_in_use() is (http_parser.HttpRequestParser.__module__
                                 == "aiohttp._http_parser")


def test_without_the_c_http_parser_the_check_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiohttp._http_parser", None)  # as if never built
    assert c_parser_in_use() is False


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


async def test_broken_http_is_400_naming_the_parser_error_and_closing(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sidecar.edge"):
        answer = await served.exchange(b"GET /hello HTTP/1.1\r\nHost x\r\n\r\n")
    (record,) = [r for r in caplog.records if r.name == "sidecar.edge"]
    assert record.getMessage() == "refused a malformed request"
    assert record.__dict__["fields"] == {"status": 400, "error": "BadHttpMessage"}
    status, body = status_and_body(answer)
    assert status == 400
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"] == "bad_http_request" and error["type"] == "invalid_request_error"
    assert str(error["message"]).startswith("The request is not valid HTTP: ")
    assert "Bad" in str(error["message"])


async def test_an_announced_body_over_the_limit_is_413_before_it_is_sent(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    raw = (b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
           b"Expect: 100-Continue\r\n\r\n" % (LIMIT + 1))
    with caplog.at_level(logging.INFO, logger="sidecar.edge"):
        answer = await served.exchange(raw)
    (record,) = [r for r in caplog.records if r.name == "sidecar.edge"]
    assert record.getMessage() == "refused an announced body over the limit"
    assert record.__dict__["fields"] == {"status": 413, "content_length": LIMIT + 1,
                                         "limit": LIMIT}
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


async def test_connections_past_the_cap_are_closed_at_once(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    held = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(2)]
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    with caplog.at_level(logging.WARNING, logger="sidecar.edge"), \
            contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    (record,) = [r for r in caplog.records if r.name == "sidecar.edge"]
    assert record.getMessage() == "connection refused: too many open"
    assert record.__dict__["fields"] == {"open": 3, "limit": 2}
    for _, w in held:
        w.close()
    await asyncio.sleep(0.05)
    answer = await served.exchange(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")


async def test_connections_up_to_the_cap_are_served_and_counted_out_when_they_close(
        served: Served) -> None:
    server = edge_server(served)
    assert server.open == 0
    held = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(2)]
    for reader, writer in held:  # the second of two is within the cap too
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"hello"), 5)
        assert head.startswith(b"HTTP/1.1 200")
    assert server.open == 2 and len(server.connections) == 2
    for _, writer in held:
        writer.close()
    await until(lambda: server.open == 0 and not server.connections)
    assert server.open == 0 and server.connections == []


async def test_the_apps_own_requests_reach_its_handlers(served: Served) -> None:
    answer = await served.exchange(b"GET /who/ann HTTP/1.1\r\nHost: x\r\n"
                                   b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ann True")


async def test_a_handlers_exception_is_aiohttps_plain_500_and_logged_with_it(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="aiohttp.server"):
        answer = await served.exchange(b"GET /boom HTTP/1.1\r\nHost: x\r\n"
                                       b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 500")
    assert b"text/plain" in answer and answer.endswith(b"500 Internal Server Error\n\n"
                                                       b"Server got itself in trouble")
    (record,) = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_the_servers_handler_settings_reach_each_connection() -> None:
    async with serving(max_field_size=100) as small:
        status, _ = status_and_body(await small.exchange(
            b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Mid: " + b"a" * 200 + b"\r\n\r\n"))
    assert status == 431


def unconnected(served: Served, sent: int) -> tuple[RequestHandler, BaseRequest]:
    """A connection's handler as the server makes it, and a request on it of which `sent`
    bytes of answer went out."""
    request = make_mocked_request("GET", "/")
    request.writer.output_size = sent
    return edge_server(served)(), request


async def test_errors_the_edge_does_not_own_pass_to_aiohttp_as_they_came(
        served: Served) -> None:
    handler, request = unconnected(served, 0)
    held = handler.handle_error(request, 503, None, "held back")
    assert isinstance(held, web.Response)
    assert held.status == 503 and held.text == "held back"
    assert handler.handle_error(request).status == 500


async def test_a_parse_error_without_an_exception_is_a_bad_request(served: Served) -> None:
    handler, request = unconnected(served, 0)
    answer = handler.handle_error(request, 400)
    assert isinstance(answer, web.Response) and answer.status == 400
    assert isinstance(answer.body, bytes)
    assert orjson.loads(answer.body)["error"]["message"] == (
        "The request is not valid HTTP: bad request.")


async def test_a_parse_error_after_the_answer_began_drops_the_connection(
        served: Served) -> None:
    handler, request = unconnected(served, 1)
    with pytest.raises(ConnectionError, match=r"^an answer was already under way$"):
        handler.handle_error(request, 400, http_exceptions.BadHttpMessage("late"))


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

    tracked = flight.track(handler, LIMIT)

    class NoExpect:
        headers: ClassVar[dict[str, str]] = {}

    task: asyncio.Task[web.StreamResponse] = asyncio.create_task(
        tracked(NoExpect()))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert flight.cancel("draining") == {task}
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reasons == ["draining"]
    assert await flight.wait_idle(0.01)
