"""The upstream client the backends use: one per upstream origin, owning its pool. A request
is written in one piece (the upstream's fixed headers are encoded once), its response's head
awaited within the headers timeout, and its body read chunk by chunk as it arrives, inflated
in bounded pieces when the upstream compresses it anyway. Redirects are answers like any other:
nothing is ever followed. A response left before its end, or a cancelled request, aborts its
connection at once; only a response read to its end returns its connection to the pool."""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import Mapping

from sidecar.transport.connection import Connection, Limits
from sidecar.transport.dial import Origin, Proxy, choose_proxy, dial, tls_context
from sidecar.transport.errors import Disconnected, ProtocolViolation
from sidecar.transport.pool import Pool

# Inflated bytes handed out per read at most, so a small compressed chunk that inflates to
# gigabytes is counted (and refused) piece by piece, never held whole.
_INFLATE_PIECE = 64 * 1024
# How long a response whose reader is done may take to deliver its last bytes.
_END_WAIT_S = 1.0
_FORBIDDEN_IN_HEADERS = ("\r", "\n", "\0")


class Response:
    __slots__ = ("_client", "_connection", "_done", "_inflater", "_tail", "headers", "status")

    def __init__(self, client: UpstreamClient, connection: Connection) -> None:
        self._client = client
        self._connection = connection
        self.status = connection.status
        self.headers: Mapping[str, str] = connection.headers  # names in lower case
        self._done = False
        self._tail = b""
        encoding = self.headers.get("content-encoding")
        self._inflater: zlib._Decompress | None = None
        if encoding is not None:
            coding = encoding.strip().lower()
            if coding in ("gzip", "x-gzip"):
                self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
            elif coding == "deflate":
                self._inflater = zlib.decompressobj(zlib.MAX_WBITS)
            elif coding not in ("", "identity"):
                raise ProtocolViolation(
                    f"the upstream used a Content-Encoding the sidecar does not read "
                    f"({coding[:40]!r})")

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None

    async def read(self, idle_s: float, heartbeat_s: float | None = None) -> bytes | None:
        """The next piece of the body (inflated); b"" at its end; None after `heartbeat_s`
        of silence. Raises ReadTimeout, BodyBroken or ProtocolViolation."""
        inflater = self._inflater
        if inflater is None:
            return await self._connection.read(idle_s, heartbeat_s)
        while True:
            if self._tail:
                piece = inflater.decompress(self._tail, _INFLATE_PIECE)
                self._tail = inflater.unconsumed_tail
                if piece:
                    return piece
            raw = await self._connection.read(idle_s, heartbeat_s)
            if raw is None:
                return None
            if not raw:
                return inflater.flush()
            try:
                piece = inflater.decompress(raw, _INFLATE_PIECE)
            except zlib.error:
                raise ProtocolViolation("the upstream's compressed body is corrupt") from None
            self._tail = inflater.unconsumed_tail
            if piece:
                return piece

    async def read_all(self, idle_s: float, limit: int) -> bytes:
        """The whole body, at most `limit` bytes after inflation (ProtocolViolation past it,
        the connection then aborted by the caller's close)."""
        chunks: list[bytes] = []
        size = 0
        while chunk := await self.read(idle_s):
            size += len(chunk)
            if size > limit:
                raise ProtocolViolation(f"the upstream's answer exceeds {limit} bytes")
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def release(self) -> None:
        """The body was read to its end: the connection may serve the next request."""
        if not self._done:
            self._done = True
            self._client.pool.release(self._connection)

    def release_at_end(self) -> None:
        """The reader is done, but the body's last bytes (a chunked body's terminator, say)
        may still be on their way: the connection returns to the pool when they arrive, and
        is closed if they do not within a moment."""
        if self._done:
            return
        self._done = True
        connection = self._connection
        pool = self._client.pool
        if connection.over:
            pool.release(connection)
            return

        def settle() -> None:
            timer.cancel()
            pool.release(connection)

        def expire() -> None:
            connection.when_over(None)
            pool.discard(connection)

        timer = asyncio.get_running_loop().call_later(_END_WAIT_S, expire)
        connection.when_over(settle)

    def close(self) -> None:
        """Leave the response where it is: the connection is aborted, never reused."""
        if not self._done:
            self._done = True
            self._client.pool.discard(self._connection)


class UpstreamClient:
    """Requests to one origin (scheme, host, port), through its pool."""

    def __init__(self, base_url: str, *, max_connections: int = 0, idle_s: float = 30.0,
                 connect_timeout_s: float = 5.0, proxy: str | None = None,
                 tls: ssl.SSLContext | None = None, limits: Limits | None = None) -> None:
        self.origin = Origin.of(base_url)
        if self.origin.scheme == "https" and tls is None:
            raise ValueError("an https upstream needs a TLS context (transport.tls_context)")
        self._tls = tls if self.origin.scheme == "https" else None
        self._proxy: Proxy | None = choose_proxy(self.origin, proxy)
        self._limits = limits or Limits()
        self._connect_timeout = connect_timeout_s
        # Plain HTTP through a proxy names the whole URL in the request line.
        self._target_prefix = (f"http://{self.origin.authority}"
                               if self._proxy is not None and self._tls is None else "")
        self._proxy_header = (
            f"Proxy-Authorization: {self._proxy.authorization}\r\n".encode("latin-1")
            if self._proxy is not None and self._tls is None and self._proxy.authorization
            else b"")
        self.pool = Pool(self._dial, max_connections, idle_s)

    def header_block(self, headers: Mapping[str, str]) -> bytes:
        """Headers sent with every request, encoded once: Host first, then these."""
        lines = [f"Host: {self.origin.authority}\r\n"]
        for name, value in headers.items():
            check_header(name, value)
            lines.append(f"{name}: {value}\r\n")
        return "".join(lines).encode("latin-1") + self._proxy_header

    async def request(self, method: str, path: str, fixed: bytes, body: bytes = b"",
                      extra: bytes = b"", *, headers_timeout_s: float) -> Response:
        """Send `method path` with the `fixed` header block (header_block's), `extra` header
        lines (already checked, each ending in CRLF) and `body`; the response once its head
        has arrived. A kept-alive connection the peer closed before answering is replaced by
        a fresh one, once."""
        head = (f"{method} {self._target_prefix}{path} HTTP/1.1\r\n".encode("latin-1") + fixed
                + extra + b"Content-Length: %d\r\n\r\n" % len(body))
        message = head + body if len(body) < 16384 else None
        for attempt in (0, 1):
            connection = self.pool.take() or await self.pool.acquire()
            try:
                if message is not None:
                    connection.send(message)
                else:
                    connection.send(head)
                    assert connection.transport is not None
                    connection.transport.write(body)
                await connection.head(headers_timeout_s)
                return Response(self, connection)
            except Disconnected:
                self.pool.discard(connection)
                if attempt or not connection.reused:
                    raise
            except BaseException:
                self.pool.discard(connection)  # cancelled or failed: aborted at once
                raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.pool.close()

    async def _dial(self) -> Connection:
        return await dial(self.origin, self._tls, self._proxy, self._limits,
                          self._connect_timeout)


def check_header(name: str, value: str) -> None:
    """A header we send may not break the request's framing."""
    if any(c in name or c in value for c in _FORBIDDEN_IN_HEADERS) or ":" in name:
        raise ValueError(f"header {name!r} holds a character HTTP does not allow there")


__all__ = ["Response", "UpstreamClient", "check_header", "tls_context"]
