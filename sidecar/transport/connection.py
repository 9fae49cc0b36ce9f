"""One HTTP/1.1 connection to an upstream, as an asyncio Protocol fed to llhttp (`httptools`).

A connection carries one request at a time. Its response's head is checked strictly before
anyone sees it (status line of HTTP/1.x, bounded header count and size, never both
Content-Length and Transfer-Encoding, chunked as the only transfer coding, no upgrade), and its
body chunks are queued as they arrive, with reading paused while the queue holds more than the
reader has taken. A connection is reusable only when its response was read to the end, the
peer allowed keep-alive, and no byte arrived that nobody asked for.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import httptools

from sidecar.transport.errors import (
    BodyBroken,
    Disconnected,
    HeadersTimeout,
    ProtocolViolation,
    ReadTimeout,
    TransportError,
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what an upstream may send in a response's head, and on buffering."""

    max_header_count: int = 100
    max_header_bytes: int = 64 * 1024
    # Unread body bytes above which the socket is no longer read (back-pressure), and below
    # which it is read again.
    buffer_high: int = 256 * 1024
    buffer_low: int = 64 * 1024


# What one interim (1xx) answer counts against max_header_bytes: 64 of them fill 64 KiB.
_INTERIM_COST = 1024


class _Violation(Exception):
    """Raised inside a parser callback; the parser wraps it, and data_received unwraps it."""


def _wake(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


class Connection(asyncio.Protocol):
    __slots__ = (
        "_body", "_buffered", "_busy", "_complete", "_error", "_head_done", "_header_bytes",
        "_interim", "_keep_alive", "_last_data", "_limits", "_loop", "_parser", "_paused",
        "_raw_headers", "_then", "_tunnel", "_until_eof", "_waiter", "closed", "headers", "reused",
        "status", "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits) -> None:
        self._loop = loop
        self._limits = limits
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[bool] | None = None
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._busy = False
        self._error: TransportError | None = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._interim = False
        self._head_done = False
        self._complete = False
        self._keep_alive = False
        self._until_eof = False
        self._last_data = 0.0
        # The answer to a CONNECT, gathered before any TLS starts over the tunnel.
        self._tunnel: bytearray | None = None
        # Called once the response is over (complete, or failed): see when_over.
        self._then: Callable[[], None] | None = None
        self.closed = False
        self.reused = False
        self.status = 0
        self.headers: dict[str, str] = {}

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._busy:
            # Bytes after a complete response (late, or a second response nobody asked
            # for): whatever they are, this connection can no longer be trusted.
            self._fail(ProtocolViolation("the upstream sent bytes after its response"))
            return
        self._last_data = self._loop.time()
        if self._tunnel is not None:
            self._tunnel += data
            self._wake_reader()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolViolation("the upstream switched protocols (HTTP 101)"))
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._fail(cause.args[0] if isinstance(cause, _Violation)
                       else ProtocolViolation("the upstream's response could not be read"))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolViolation(f"malformed response from the upstream ({exc})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._busy and self._error is None:
            if self._head_done and self._until_eof:
                self._complete = True  # a body delimited by the connection's end
                self._busy = False
            elif self._head_done:
                self._error = BodyBroken("the upstream closed the connection mid-answer")
            else:
                self._error = Disconnected("the upstream closed the connection")
        self._wake_reader()
        self._call_then()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise _Violation(ProtocolViolation("the upstream sent a second response"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if len(self._raw_headers) >= self._limits.max_header_count:
            raise _Violation(ProtocolViolation(
                f"the upstream sent more than {self._limits.max_header_count} headers"))
        if self._header_bytes > self._limits.max_header_bytes:
            raise _Violation(ProtocolViolation(
                f"the upstream's headers exceed {self._limits.max_header_bytes} bytes"))
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if parser.get_http_version() not in ("1.1", "1.0"):
            raise _Violation(ProtocolViolation("the upstream did not answer in HTTP/1.x"))
        if status < 200:
            if status == 101:
                raise _Violation(ProtocolViolation("the upstream switched protocols (HTTP 101)"))
            self._interim = True  # 100 Continue, 103 Early Hints: the real answer follows
            self._raw_headers = []
            # Each costs a few bytes: without a count, an upstream could send them until the
            # headers timeout. (Their header bytes keep counting towards the limit.)
            self._header_bytes += _INTERIM_COST
            if self._header_bytes > self._limits.max_header_bytes:
                raise _Violation(ProtocolViolation("the upstream sent too many 1xx answers"))
            return
        headers: dict[str, str] = {}
        for raw_name, raw_value in self._raw_headers:
            # Latin-1 maps every byte: a value that is not UTF-8 is kept, never an error.
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            if name in headers:
                if name in ("content-length", "transfer-encoding", "content-encoding"):
                    raise _Violation(ProtocolViolation(f"the upstream repeated {name}"))
                headers[name] = f"{headers[name]}, {value}"
            else:
                headers[name] = value
        coding = headers.get("transfer-encoding")
        if coding is not None:
            if "content-length" in headers:
                raise _Violation(ProtocolViolation(
                    "the upstream sent both Content-Length and Transfer-Encoding"))
            if coding.strip().lower() != "chunked":
                raise _Violation(ProtocolViolation(
                    "the upstream used a transfer coding other than chunked"))
        self._until_eof = (coding is None and "content-length" not in headers
                           and status not in (204, 304))
        self.status = status
        self.headers = headers
        self._head_done = True
        self._wake_reader()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > self._limits.buffer_high and not self._paused:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake_reader()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True
        self._busy = False
        self._keep_alive = self._parser.should_keep_alive() and not self._until_eof
        self._wake_reader()
        self._call_then()

    # -- what the pool and the response use --------------------------------------------------

    @property
    def reusable(self) -> bool:
        """Whole response read, keep-alive allowed, nothing unread, not closed."""
        return (self._complete and self._keep_alive and not self._body and not self.closed
                and self._error is None)

    @property
    def over(self) -> bool:
        """The response is complete, or will never be."""
        return self._complete or self._error is not None or self.closed

    def when_over(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` once the response is over (None: call nothing)."""
        self._then = callback

    @property
    def idle(self) -> bool:
        return not self._busy

    def send(self, data: bytes) -> None:
        """Write a request; the previous response must have been read to its end."""
        assert self.transport is not None and not self._busy
        self._raw_headers = []
        self._header_bytes = 0
        self._head_done = self._complete = self._until_eof = False
        self.status = 0
        self.headers = {}
        self._busy = True
        self._last_data = self._loop.time()
        if self.closed:  # the peer left before this request: nothing will ever answer it
            self._error = Disconnected("the upstream closed the connection")
            return
        self.transport.write(data)

    def start_tunnel(self, request: bytes) -> None:
        """Send a CONNECT; its answer is gathered raw (see tunnel_answer)."""
        self._tunnel = bytearray()
        self.send(request)

    async def tunnel_answer(self, limit: int) -> int:
        """The status of the proxy's answer to CONNECT; bytes past its head are an error."""
        assert self._tunnel is not None
        while (end := self._tunnel.find(b"\r\n\r\n")) < 0:
            if len(self._tunnel) > limit:
                raise ProtocolViolation("the proxy's answer to CONNECT is too long")
            if self._error is not None:
                raise self._error
            await self._wait(3600.0)
        head, rest = bytes(self._tunnel[:end]), self._tunnel[end + 4:]
        self._tunnel = None
        self._busy = False
        if rest:
            raise ProtocolViolation("the proxy sent bytes before the tunnel was used")
        parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolViolation("the proxy's answer to CONNECT is not HTTP/1.x")
        return int(parts[1])

    def use_transport(self, transport: asyncio.Transport) -> None:
        """The TLS transport that now wraps the tunnel; the parser starts afresh."""
        self.transport = transport
        self._parser = httptools.HttpResponseParser(self)

    async def head(self, within_s: float) -> None:
        """Wait for the response's head (status and headers)."""
        deadline = self._loop.time() + within_s
        while not self._head_done:
            if self._error is not None:
                raise self._error
            left = deadline - self._loop.time()
            if left <= 0 or not await self._wait(left):
                if self._head_done:
                    break
                raise HeadersTimeout(f"no response headers within {within_s:g}s")

    async def read(self, idle_s: float, heartbeat_s: float | None = None) -> bytes | None:
        """The next body chunk as it came; b"" once the body is complete; None when
        `heartbeat_s` passed without a byte (the idle clock keeps running)."""
        while True:
            body = self._body
            if body:
                chunk = body.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered <= self._limits.buffer_low:
                    self._paused = False
                    if self.transport is not None and not self.closed:
                        self.transport.resume_reading()
                return chunk
            if self._complete:  # whole, even if bytes that came after it poisoned the line
                return b""
            if self._error is not None:
                raise self._error
            left = self._last_data + idle_s - self._loop.time()
            if left <= 0:
                raise ReadTimeout(f"the upstream sent nothing for {idle_s:g}s")
            wait = left if heartbeat_s is None or heartbeat_s > left else heartbeat_s
            if not await self._wait(wait) and not self._body and self._error is None:
                if self._last_data + idle_s <= self._loop.time():
                    raise ReadTimeout(f"the upstream sent nothing for {idle_s:g}s")
                if heartbeat_s is not None:
                    return None

    def abort(self) -> None:
        """Drop the connection at once (the peer sees it closed); it is never used again."""
        self.closed = True
        if self._error is None:
            self._error = BodyBroken("the request was abandoned")
        if self.transport is not None:
            self.transport.abort()

    # -- inside --------------------------------------------------------------------------------

    def _fail(self, error: TransportError) -> None:
        if self._error is None:
            self._error = error
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._wake_reader()
        self._call_then()

    def _call_then(self) -> None:
        then = self._then
        if then is not None:
            self._then = None
            then()

    def _wake_reader(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    async def _wait(self, at_most_s: float) -> bool:
        """True when something happened to this connection, False when `at_most_s` passed."""
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._waiter = waiter
        timer = self._loop.call_later(at_most_s, _wake, waiter, False)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None
