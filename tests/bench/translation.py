"""What translating a stream costs per chunk, on its own: OpenAI chunks read into events and
written as Messages events (and the other way round), as the path does for a front door and a
target of different protocols, each chunk timed. Not a wall-clock figure through sockets, so
it does not move with the machine's load as much; `tests/bench/gateway.py` has that one.

    python -m tests.bench.translation
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncGenerator, Callable

import orjson

from sidecar.api.anthropic_writer import frame
from sidecar.crossing import messages_events_of, openai_chunks_of
from sidecar.protocol.chat import ChatRequest
from sidecar.protocol.sse import frame as openai_frame

CHUNKS = 64


def openai_chunks() -> list[bytes]:
    return [orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
        "model": "bench-upstream", "choices": [{"index": 0, "delta": {"content": f"t{i} "},
                                                "finish_reason": None}]})
        for i in range(CHUNKS)]


def anthropic_events() -> list[bytes]:
    start = orjson.dumps({"type": "message_start", "message": {
        "id": "msg_bench", "type": "message", "role": "assistant", "model": "bench-upstream",
        "content": [], "stop_reason": None, "usage": {"input_tokens": 12, "output_tokens": 1}}})
    block = orjson.dumps({"type": "content_block_start", "index": 0,
                          "content_block": {"type": "text", "text": ""}})
    return [start, block, *(orjson.dumps({"type": "content_block_delta", "index": 0, "delta": {
        "type": "text_delta", "text": f"t{i} "}}) for i in range(CHUNKS))]


async def replay(items: list[bytes]) -> AsyncGenerator[bytes, None]:
    for item in items:
        yield item


async def timed(stream: AsyncGenerator[bytes, None], framing: Callable[[bytes], bytes]
                ) -> list[float]:
    """Microseconds from asking for the next translated event to holding its framed bytes."""
    out: list[float] = []
    while True:
        started = time.perf_counter_ns()
        try:
            data = await anext(stream)
        except StopAsyncIteration:
            return out
        framing(data)
        out.append((time.perf_counter_ns() - started) / 1000)


async def main() -> None:
    rounds = 300
    to_messages: list[float] = []
    to_chunks: list[float] = []
    passed: list[float] = []
    chunks, events = openai_chunks(), anthropic_events()
    request = ChatRequest(model="bench", include_usage=True)
    for _ in range(rounds):
        to_messages += await timed(messages_events_of(replay(chunks), "bench"), frame)
        to_chunks += await timed(openai_chunks_of(replay(events), request), openai_frame)
        passed += await timed(replay(chunks), openai_frame)
    print(f"\nper chunk, microseconds ({rounds} streams of {CHUNKS} chunks)\n")
    print("| path | p50 | p99 |")
    print("|---|---|---|")
    for name, values in (("passed through (framing only)", passed),
                         ("OpenAI chunks -> Messages events", to_messages),
                         ("Messages events -> OpenAI chunks", to_chunks)):
        cuts = statistics.quantiles(values, n=100)
        print(f"| {name} | {cuts[49]:.1f} | {cuts[98]:.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
