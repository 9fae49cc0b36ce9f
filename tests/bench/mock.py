"""A mock upstream fast enough never to be the bottleneck: a raw asyncio protocol on uvloop with
canned answers, OpenAI's, or Anthropic's for a request to `/v1/messages`. A streaming request
gets `chunks` events `delay_ms` apart, each stamped with the monotonic time it left: as
`sent_ns`, and in its text after an `@`, which a translation into another protocol keeps."""

from __future__ import annotations

import asyncio
import re
import sys
import time

import orjson
import uvloop

ANSWER = orjson.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
    "model": "bench-upstream", "system_fingerprint": "fp_bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content":
                 "The quick brown fox jumps over the lazy dog.", "refusal": None},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22},
})
MESSAGE = orjson.dumps({
    "id": "msg_bench", "type": "message", "role": "assistant", "model": "bench-upstream",
    "content": [{"type": "text", "text": "The quick brown fox jumps over the lazy dog."}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 10},
})
MESSAGE_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(MESSAGE)).encode() + b"\r\n\r\n" + MESSAGE
)
JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(ANSWER)).encode() + b"\r\n\r\n" + ANSWER
)
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
# As a field of the body, or inside its text (quotes escaped), where a translation keeps it.
_KNOB = re.compile(rb'\\?"bench\\?":\{\\?"chunks\\?":(\d+),\\?"delay_ms\\?":(\d+(?:\.\d+)?)\}')


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.streams: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            found = _LENGTH.search(self.buffer, 0, end + 2)
            length = int(found[1]) if found else 0
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            messages = self.buffer.startswith(b"POST /v1/messages ")
            self.buffer = self.buffer[end + 4 + length:]
            knob = _KNOB.search(body)
            if knob and b'"stream":true' in body:
                task = asyncio.ensure_future(self.stream(int(knob[1]), float(knob[2]) / 1000,
                                                         messages))
                self.streams.add(task)
                task.add_done_callback(self.streams.discard)
            else:
                assert self.transport is not None
                self.transport.write(MESSAGE_RESPONSE if messages else JSON_RESPONSE)

    async def stream(self, chunks: int, delay: float, messages: bool) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(STREAM_HEAD)
        if messages:
            transport.write(_chunk(MESSAGE_START))
        for i in range(chunks):
            if transport.is_closing():
                return
            sent = time.monotonic_ns()
            if messages:
                event = b"event: content_block_delta\ndata: " + orjson.dumps({
                    "type": "content_block_delta", "index": 0, "sent_ns": sent,
                    "delta": {"type": "text_delta", "text": f"t{i}@{sent} "}})
            else:
                event = b"data: " + orjson.dumps({
                    "id": "chatcmpl-bench", "object": "chat.completion.chunk",
                    "created": 1700000000, "model": "bench-upstream", "sent_ns": sent,
                    "choices": [{"index": 0, "delta": {"content": f"t{i}@{sent} "},
                                 "finish_reason": None}]})
            transport.write(_chunk(event + b"\n\n"))
            if delay and i + 1 < chunks:
                await asyncio.sleep(delay)
        transport.write(_chunk(MESSAGE_END if messages else b"data: [DONE]\n\n") +
                        b"0\r\n\r\n")


MESSAGE_START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_bench",'
    b'"type":"message","role":"assistant","model":"bench-upstream","content":[],'
    b'"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":1}}}'
    b'\n\nevent: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n')
MESSAGE_END = (
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
    b'"stop_sequence":null},"usage":{"output_tokens":10}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
