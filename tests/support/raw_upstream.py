"""A raw asyncio HTTP/1.1 server on loopback, in the test's loop, that answers each request
with whatever bytes the test scripts, malformed ones included; it records each connection,
each request it read, and when it saw each connection end (EOF or reset)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    head: bytes
    body: bytes
    # The connection's reader, for a handler that watches for the client leaving mid-answer.
    reader: asyncio.StreamReader | None = None

    @property
    def line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode()

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode("latin-1")
        return None


# A handler answers one request on a connection; returning False closes the connection.
Handler = Callable[[Request, asyncio.StreamWriter], Awaitable[bool | None]]


@dataclass
class RawUpstream:
    port: int = 0
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    ended: list[float] = field(default_factory=list)  # monotonic time each connection ended
    ended_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_ended(self, count: int = 1, within_s: float = 2.0) -> float:
        """When the `count`-th connection end was seen."""
        async with asyncio.timeout(within_s):
            while len(self.ended) < count:
                self.ended_event.clear()
                await self.ended_event.wait()
        return self.ended[count - 1]


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    request = Request(head, b"")
    length = request.header("content-length")
    if length:
        request.body = await reader.readexactly(int(length))
    return request


@contextlib.asynccontextmanager
async def raw_upstream(handler: Handler, tls: ssl.SSLContext | None = None
                       ) -> AsyncIterator[RawUpstream]:
    state = RawUpstream()
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    break
                request.reader = reader
                state.requests.append(request)
                if await handler(request, writer) is False:
                    break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError,
                asyncio.CancelledError):
            pass  # the client left, or the test is over
        finally:
            state.ended.append(time.monotonic())
            state.ended_event.set()
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def wait_eof(reader: asyncio.StreamReader | None) -> float:
    """Until the client closes its side (or resets): when that was seen."""
    assert reader is not None
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass
    return time.monotonic()


def answer(body: bytes = b'{"ok":true}', status: str = "200 OK",
           headers: str = "Content-Type: application/json\r\n") -> bytes:
    return (f"HTTP/1.1 {status}\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode()
            + body)
