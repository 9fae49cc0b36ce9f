"""The connection layer: a cap on open connections, header limits answered with 431, protocol
errors in the OpenAI shape, an oversize `Expect: 100-continue` body refused before it is sent,
the requests in flight (for a drain), and a check that aiohttp's C HTTP parser is in use."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import hdrs, http_exceptions, http_parser, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from sidecar.api.http import error_response
from sidecar.errors import PayloadTooLarge, error_body

RawHandler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]

log = logging.getLogger("sidecar.edge")


def c_parser_in_use() -> bool:
    try:
        from aiohttp._http_parser import (  # type: ignore[import-not-found]
            HttpRequestParser as CParser,
        )
    except ImportError:
        return False
    return bool(http_parser.HttpRequestParser is CParser)


class EdgeHandler(RequestHandler):
    """aiohttp's protocol handler with our answers to what goes wrong below HTTP."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self._manager
        if isinstance(server, EdgeServer) and server.open > server.max_connections:
            log.warning("connection refused: too many open",
                        extra={"fields": {"open": server.open, "limit": server.max_connections}})
            self.force_close()
            if isinstance(transport, asyncio.Transport):
                transport.abort()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, http_exceptions.LineTooLong) or (
            isinstance(exc, http_exceptions.BadHttpMessage) and "Too many headers" in str(exc)
        ):
            status = 431
            text = "The request's headers are too large or too many."
            code = "request_header_fields_too_large"
        elif status < 500:
            text = f"The request is not valid HTTP: {type(exc).__name__ if exc else 'bad request'}."
            code = "bad_http_request"
        else:
            return super().handle_error(request, status, exc, message)
        # Not aiohttp's own logging: its message quotes the start of the offending line, which
        # may be an Authorization header.
        log.info("refused a malformed request",
                 extra={"fields": {"status": status, "error": type(exc).__name__}})
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already under way")
        body = error_body(text, "invalid_request_error", None, code)
        answer = web.json_response(body, status=status)
        answer.force_close()
        return answer


class EdgeServer(web.Server):
    def __init__(self, *args: Any, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.open = 0

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open += 1

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.open -= 1

    def __call__(self) -> RequestHandler:
        return EdgeHandler(self, loop=self._loop, **self._kwargs)


class InFlight:
    """The requests being handled, so that a stopping server can wait for them and then end
    those still running (with a reason their handlers can tell from a client leaving)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def track(self, handler: RawHandler, max_body_bytes: int) -> RawHandler:
        tasks, idle = self.tasks, self._idle

        async def tracked(request: BaseRequest) -> web.StreamResponse:
            if hdrs.EXPECT in request.headers:
                refused = _refuse_expected_body(request, max_body_bytes)
                if refused is not None:
                    return refused
            task = asyncio.current_task()
            assert task is not None  # aiohttp runs each request in a task of its own
            tasks.add(task)
            idle.clear()
            try:
                return await handler(request)
            finally:
                tasks.discard(task)
                if not tasks:
                    idle.set()

        return tracked

    async def wait_idle(self, within_s: float) -> bool:
        """True once no request is in flight; False if some still are after `within_s`."""
        try:
            async with asyncio.timeout(within_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def cancel(self, reason: str) -> set[asyncio.Task[Any]]:
        left = set(self.tasks)
        for task in left:
            task.cancel(reason)
        return left


def _refuse_expected_body(request: BaseRequest, limit: int) -> web.StreamResponse | None:
    """A client that asks before sending (Expect: 100-continue) a body over the limit gets its
    413 at once, instead of `100 Continue`, an upload, and then the 413."""
    length = request.content_length
    if length is None or length <= limit or \
            request.headers[hdrs.EXPECT].lower() != "100-continue":
        return None
    log.info("refused an announced body over the limit",
             extra={"fields": {"status": 413, "content_length": length, "limit": limit}})
    answer = error_response(PayloadTooLarge(
        f"The request body is larger than the {limit} bytes this server accepts."))
    answer.force_close()  # the body, if the client sends it anyway, is not read
    return answer


class Dispatch(Protocol):
    """Where the edge hands each request: the application current when it arrives."""

    async def handle(self, request: BaseRequest) -> web.StreamResponse: ...

    def make_request(self, *args: Any) -> BaseRequest: ...

    async def close(self) -> None: ...


class EdgeRunner(web.BaseRunner):
    """The listeners' runner: connections served by EdgeHandler, each request handed to
    `dispatch` and tracked while in flight."""

    def __init__(self, dispatch: Dispatch, *, max_connections: int, max_body_bytes: int,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._dispatch = dispatch
        self._max_connections = max_connections
        self._max_body_bytes = max_body_bytes
        self.in_flight = InFlight()

    async def shutdown(self) -> None:
        # Saying "draining" and waiting for requests is the server's drain, before this.
        pass

    async def _make_server(self) -> web.Server:
        return EdgeServer(
            self.in_flight.track(self._dispatch.handle, self._max_body_bytes),
            request_factory=self._dispatch.make_request,
            loop=asyncio.get_running_loop(),
            max_connections=self._max_connections,
            **self._kwargs,
        )

    async def _cleanup_server(self) -> None:
        await self._dispatch.close()
