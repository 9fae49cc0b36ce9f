"""WebSocket figures, measured in one run against the sidecar as its own process and the mock
OpenAI upstream on loopback: the time to the first token of a WebSocket turn on an open
socket against an SSE request on a kept-alive connection (p50, interleaved so that the
machine's load falls on both alike), and the sidecar's added RSS with 1,000 idle WebSockets
open, with a chat request's time before and while they are open.

    python -m tests.bench.websockets
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from tests.support.sidecar import base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}],
        "mock": {"chunks": 8}}
STREAM_BODY = orjson.dumps({**BODY, "stream": True})
BODY_TEXT = orjson.dumps(BODY).decode()
# The body is sent as bytes: aiohttp's `json=` writes headers and body in separate segments,
# and the delayed ACK that follows costs some 10 ms per request on loopback, which would be
# measured as the sidecar's.
JSON = {"Content-Type": "application/json"}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def sse_first_token(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", data=STREAM_BODY,
                            headers=JSON) as reply:
        first = 0.0
        async for line in reply.content:
            if not first and line.startswith(b"data: {"):
                first = time.perf_counter() - started
        return first


async def socket_first_token(socket: aiohttp.ClientWebSocketResponse) -> float:
    started = time.perf_counter()
    await socket.send_str(BODY_TEXT)
    first = 0.0
    while True:
        message = orjson.loads((await socket.receive()).data)
        if not first:
            first = time.perf_counter() - started
        if message.get("type") == "error":
            raise RuntimeError(f"the turn failed: {message}")
        if message.get("type") == "done":
            return first


async def chat_ms(session: aiohttp.ClientSession, url: str, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        async with session.post(url + "/v1/chat/completions", data=orjson.dumps(BODY),
                                headers=JSON) as reply:
            await reply.read()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def measure(url: str, pid: int, turns: int, idle: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        socket = await session.ws_connect(url + "/v1/chat/completions/ws")
        sse, ws = [], []
        for i in range(turns + 20):
            a = await sse_first_token(session, url)
            b = await socket_first_token(socket)
            if i >= 20:  # warm-up
                sse.append(a * 1000)
                ws.append(b * 1000)
        await socket.close()
        print(f"first token, p50 of {turns}: SSE request (kept-alive) "
              f"{statistics.median(sse):.3f} ms, WebSocket turn {statistics.median(ws):.3f} ms,"
              f" ratio {statistics.median(ws) / statistics.median(sse):.2f}")
        warm_ms = await chat_ms(session, url, 50)
        before_ms = await chat_ms(session, url, 50)
        print(f"chat request p50 of 50, twice before: {warm_ms:.3f} ms, {before_ms:.3f} ms")
        before = rss_kib(pid)
        sockets = [await session.ws_connect(url + "/v1/chat/completions/ws")
                   for _ in range(idle)]
        await asyncio.sleep(1.0)
        after = rss_kib(pid)
        during_ms = await chat_ms(session, url, 50)
        print(f"{idle} idle WebSockets: sidecar RSS {before / 1024:.1f} MiB -> "
              f"{after / 1024:.1f} MiB (+{(after - before) / 1024:.1f} MiB, "
              f"{(after - before) * 1024 / idle / 1024:.1f} KiB each)")
        print(f"chat request p50 of 50: {before_ms:.3f} ms before, {during_ms:.3f} ms with "
              f"the idle sockets open")
        await asyncio.gather(*(s.close() for s in sockets))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--idle", type=int, default=1000)
    args = parser.parse_args()
    mock = MockUpstream()
    mock.start()
    try:
        with tempfile.TemporaryDirectory() as workdir:
            sidecar = start_sidecar(base_config(mock, server="ws_messages_per_minute = 100000"),
                                    Path(workdir))
            try:
                asyncio.run(measure(sidecar.url, sidecar.process.pid, args.turns, args.idle))
            finally:
                sidecar.stop()
    finally:
        mock.stop()


if __name__ == "__main__":
    main()
