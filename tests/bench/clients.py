"""The upstream client alone: the sidecar's transport (sidecar/transport/) against aiohttp's
client, in one process pinned to one core, on the benchmark mock, alternating runs.

Each run is measured in CPU seconds of this process (the mock runs on the other core), so the
ratios hold on a busy machine better than requests per second do: non-streamed requests (16
at a time), and SSE frames read and split into events (20 streams of 500 frames sent in
bursts, and 20 of 100 frames 1 ms apart).

    python -m tests.bench.clients            # a table
    python -m tests.bench.clients --json     # rows for tests/bench/gateway.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import uvloop

from sidecar.protocol.sse import EventSplitter
from sidecar.transport import UpstreamClient
from tests.bench.gateway import CHAT, LOAD_CPU, PY, free_port, process

HEADERS = {"User-Agent": "bench", "Content-Type": "application/json",
           "Authorization": "Bearer sk-bench-not-a-real-key"}


def stream_body(chunks: int, delay_ms: float) -> bytes:
    return orjson.dumps({**CHAT, "stream": True, "bench": {"chunks": chunks,
                                                          "delay_ms": delay_ms}})


async def ours(base: str, requests: int, body: bytes, stream: bool) -> int:
    """Requests (or stream events) done with the sidecar's transport."""
    client = UpstreamClient(base)
    fixed = client.header_block(HEADERS)
    count = 0

    async def worker(n: int) -> None:
        nonlocal count
        for _ in range(n):
            response = await client.request("POST", "/v1/chat/completions", fixed, body,
                                            b"X-Request-Id: bench\r\n", headers_timeout_s=10)
            if not stream:
                await response.read_all(10, 1 << 20)
                count += 1
            else:
                splitter = EventSplitter()
                while chunk := await response.read(10):
                    count += len(splitter.feed(chunk))
            response.release()

    workers = 16 if not stream else requests
    per = requests // 16 if not stream else 1
    await asyncio.gather(*(worker(per) for _ in range(workers)))
    await client.close()
    return count


async def theirs(base: str, requests: int, body: bytes, stream: bool) -> int:
    """The same with aiohttp's client, read as the sidecar read it before."""
    count = 0
    url = base + "/v1/chat/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker(n: int) -> None:
            nonlocal count
            for _ in range(n):
                async with session.post(url, data=body, headers=HEADERS) as response:
                    if not stream:
                        await response.read()
                        count += 1
                        continue
                    splitter = EventSplitter()
                    while chunk := await response.content.readany():
                        count += len(splitter.feed(chunk))

        workers = 16 if not stream else requests
        per = requests // 16 if not stream else 1
        await asyncio.gather(*(worker(per) for _ in range(workers)))
    return count


Run = Callable[[str, int, bytes, bool], Awaitable[int]]


def cpu_us_per_item(run: Run, base: str, requests: int, body: bytes, stream: bool) -> float:
    started = time.process_time()
    items = uvloop.run(run(base, requests, body, stream))
    return (time.process_time() - started) * 1e6 / items


def measure(rounds: int) -> list[tuple[str, str, str, str, str]]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cases = [
        ("upstream client alone: CPU-us per non-streamed request (16 at a time)", 3200,
         orjson.dumps(CHAT), False, ""),
        ("upstream client alone: CPU-us per SSE frame (20 x 500, bursts)", 20,
         stream_body(500, 0), True, "<= 1.00"),
        ("upstream client alone: CPU-us per SSE frame (20 x 100, 1 ms apart)", 20,
         stream_body(100, 1), True, "<= 1.00"),
    ]
    rows = []
    with process([PY, "-m", "tests.bench.mock", str(port)], LOAD_CPU, port):
        for label, requests, body, stream, goal in cases:
            cpu_us_per_item(ours, base, requests, body, stream)  # warm up
            cpu_us_per_item(theirs, base, requests, body, stream)
            pairs = [(cpu_us_per_item(theirs, base, requests, body, stream),
                      cpu_us_per_item(ours, base, requests, body, stream))
                     for _ in range(rounds)]
            ratio = statistics.median(o / t for t, o in pairs)
            rows.append((label, f"{statistics.median(t for t, _ in pairs):.1f}",
                         f"{statistics.median(o for _, o in pairs):.1f}", f"{ratio:.2f}", goal))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = measure(args.rounds)
    if args.json:
        sys.stdout.write(orjson.dumps(rows).decode() + "\n")
        return 0
    for row in rows:
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
