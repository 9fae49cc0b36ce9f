"""An egress HTTP proxy on loopback, in the test's loop: it tunnels CONNECT to the named
loopback port and answers absolute-URL requests itself, recording each request head it got
(so a test sees the CONNECT line and its Proxy-Authorization)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from tests.support.raw_upstream import Request, answer, read_request


class Proxy:
    """An egress proxy on loopback: tunnels CONNECT, answers absolute-URL requests itself."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.heads: list[Request] = []
        self.port = 0


@contextlib.asynccontextmanager
async def egress_proxy(refuse: bool = False) -> AsyncIterator[Proxy]:
    proxy = Proxy(refuse)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if request is None:
            writer.close()
            return
        proxy.heads.append(request)
        if proxy.refuse:
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                         b"Content-Length: 0\r\n\r\n")
            writer.close()
            return
        if not request.line.startswith("CONNECT "):
            writer.write(answer(request.line.encode()))  # the absolute form, answered here
            await writer.drain()
            writer.close()
            return
        host, port = request.line.split()[1].rsplit(":", 1)
        target_reader, target_writer = await asyncio.open_connection(
            "127.0.0.1" if host == "localhost" else host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with contextlib.suppress(asyncio.CancelledError):  # the test is over
            await asyncio.gather(pipe(reader, target_writer), pipe(target_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()
