"""A fake OpenAI-compatible upstream: a real aiohttp server on loopback, in its own thread,
speaking the OpenAI wire format (JSON, SSE, error bodies) and misbehaving on request.

A test steers it through a `mock` object in the request body, which the sidecar forwards like any
other field it does not understand:
    status, error, retry_after  answer this error (with `fail_first`: only the first N times)
    fail_first, key             fail the first N requests carrying this key, then answer normally
    disconnect                  close the connection without answering (with fail_first)
    delay_s                     wait this long before answering at all
    only_models                 misbehave only when the upstream model id is in this list
    garbage                     answer 200 with a body that is not JSON
    chunks, chunk_delay         a stream of N content chunks, this many seconds apart
    silent_s                    wait this long after the stream's headers before the first chunk
    reset_after, stall_after    break or go silent after this many chunks
    no_done                     end the stream cleanly but without [DONE]
    pad                         pretty-print a JSON answer with whitespace around it
    error_headers               more response headers for the error answer (with status)
    echo_headers                the error's message quotes every request header received
    redirect, redirect_status   answer a redirect (307 unless told) to this URL
    gzip_bomb                   a gzip body inflating to this many bytes, then never end it
    sse_flood                   a gzip stream: `flood_after` events, then this many bytes
                                without an event separator, then never end it
    error_event                 a stream: after its first chunk, an error event and the end
Every request, whatever its method or path, is counted in `hits` (method, path).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from tests.support.loopback import ThreadedServer

MOCK_KEY = web.RequestKey("mock_key", str)


@dataclass
class Seen:
    path: str
    headers: CIMultiDict[str]
    body: dict[str, Any]


class MockUpstream(ThreadedServer):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Seen] = []
        self.aborted: list[str] = []
        self.aborted_event = threading.Event()
        self.hits: list[tuple[str, str]] = []
        self._counters: dict[str, int] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:  # type: ignore[override]
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._watch])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        super().start(app, handler_cancellation=True)

    def reset(self) -> None:
        self.requests.clear()
        self.aborted.clear()
        self.aborted_event.clear()
        self.hits.clear()
        self._counters.clear()

    def count(self, path: str = "/v1/chat/completions") -> int:
        return sum(1 for seen in self.requests if seen.path == path)

    @web.middleware
    async def _watch(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Records each request, and each the sidecar abandons before its answer is complete."""
        self.hits.append((request.method, request.path))
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except (asyncio.CancelledError, ConnectionResetError):
            self.aborted.append(str(request.get(MOCK_KEY, "")))
            self.aborted_event.set()
            raise

    # -- behaviours common to every endpoint -------------------------------------------------

    async def _receive(
        self, request: web.Request
    ) -> tuple[dict[str, Any], web.StreamResponse | None]:
        body = orjson.loads(await request.read())
        self.requests.append(Seen(request.path, request.headers.copy(), body))
        mock = body.get("mock") or {}
        request[MOCK_KEY] = mock.get("key", "")
        if "only_models" in mock and body.get("model") not in mock["only_models"]:
            return body, None  # the misbehaviour is for other targets
        if mock.get("fail_first") is not None:
            key = str(mock.get("key", "default"))
            self._counters[key] = self._counters.get(key, 0) + 1
            if self._counters[key] > mock["fail_first"]:
                return body, None
        if mock.get("delay_s"):
            await asyncio.sleep(float(mock["delay_s"]))
        if mock.get("disconnect"):
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        if mock.get("redirect"):
            return body, web.Response(status=int(mock.get("redirect_status", 307)),
                                      headers={"Location": str(mock["redirect"])})
        if mock.get("gzip_bomb"):
            return body, await _hold_open(request, _gzip_bomb(int(mock["gzip_bomb"])),
                                          "application/json")
        if mock.get("status"):
            status = int(mock["status"])
            error = mock.get("error") or {
                "message": f"mock error {status}" + _echo(request, mock),
                "type": "server_error" if status >= 500 else "invalid_request_error",
                "param": None,
                "code": None,
            }
            headers = {str(k): str(v) for k, v in (mock.get("error_headers") or {}).items()}
            if mock.get("retry_after") is not None:
                headers["Retry-After"] = str(mock["retry_after"])
            return body, web.json_response({"error": error}, status=status, headers=headers)
        if mock.get("garbage"):
            return body, web.Response(text="<html>upstream exploded</html>",
                                      content_type="application/json")
        return body, None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._receive(request)
        if early is not None:
            return early
        text, tool_call = _reply(body)
        if body.get("stream"):
            return await self._stream(request, body, text, tool_call, _chat_chunk)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        finish = "stop"
        if tool_call is not None:
            message["content"] = None
            message["tool_calls"] = [tool_call]
            finish = "tool_calls"
        n = int(body.get("n") or 1)
        pad = bool((body.get("mock") or {}).get("pad"))
        return _json(pad=pad, obj={
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_mock",
            "choices": [
                {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                for i in range(n)
            ],
            "usage": _usage(body, text),
        })

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._receive(request)
        if early is not None:
            return early
        prompt = body.get("prompt")
        text = f" echo: {prompt if isinstance(prompt, str) else 'tokens'}"
        if body.get("stream"):
            return await self._stream(request, body, text, None, _completion_chunk)
        return _json({
            "id": "cmpl-mock",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
            "usage": _usage(body, text),
        })

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._receive(request)
        if early is not None:
            return early
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dims = int(body.get("dimensions") or 8)
        data = [
            {"object": "embedding", "index": i, "embedding": [round(0.1 * (i + 1), 3)] * dims}
            for i in range(len(inputs))
        ]
        return _json({"object": "list", "data": data, "model": body["model"],
                      "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})

    async def _stream(self, request: web.Request, body: dict[str, Any], text: str,
                      tool_call: dict[str, Any] | None, make: Any) -> web.StreamResponse:
        mock = body.get("mock") or {}
        words = _split(text, int(mock["chunks"]) if mock.get("chunks") else None)
        if mock.get("sse_flood"):
            events = b"".join(b"data: " + orjson.dumps(make(body, word, first=(i == 0)))
                              + b"\n\n" for i, word in enumerate(words[:mock.get("flood_after",
                                                                                  0)]))
            return await _hold_open(request, _sse_flood(events, int(mock["sse_flood"])),
                                    "text/event-stream")
        delay = float(mock.get("chunk_delay", 0))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if mock.get("silent_s"):
            await asyncio.sleep(float(mock["silent_s"]))
        pieces = [make(body, word, first=(i == 0)) for i, word in enumerate(words)]
        if tool_call is not None:
            pieces = [make(body, None, first=True, tool_call=tool_call)]
        for sent, piece in enumerate(pieces):
            if mock.get("reset_after") is not None and sent >= mock["reset_after"]:
                assert request.transport is not None
                request.transport.abort()
                return response
            if mock.get("stall_after") is not None and sent >= mock["stall_after"]:
                await asyncio.sleep(3600)
            piece["sent_ns"] = time.monotonic_ns()
            await response.write(b"data: " + orjson.dumps(piece) + b"\n\n")
            if mock.get("error_event"):
                error = {"message": "mock error mid-stream" + _echo(request, mock),
                         "type": "server_error", "param": None, "code": None}
                await response.write(b"data: " + orjson.dumps({"error": error}) + b"\n\n")
                await response.write_eof()
                return response
            if delay:
                await asyncio.sleep(delay)
        finish = "tool_calls" if tool_call is not None else "stop"
        await response.write(b"data: " + orjson.dumps(make(body, None, finish=finish)) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage_chunk = make(body, None, usage=_usage(body, text))
            await response.write(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
        if not mock.get("no_done"):
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _echo(request: web.Request, mock: dict[str, Any]) -> str:
    """What an upstream that quotes the request it got would add to its error message."""
    if not mock.get("echo_headers"):
        return ""
    return "; you sent " + ", ".join(f"{k}: {v}" for k, v in request.headers.items())


async def _hold_open(request: web.Request, compressed: bytes, kind: str) -> web.StreamResponse:
    """Send gzip bytes as they are, then keep the connection open until the reader leaves."""
    response = web.StreamResponse(headers={"Content-Type": kind, "Content-Encoding": "gzip"})
    await response.prepare(request)
    for start in range(0, len(compressed), 64 * 1024):
        await response.write(compressed[start:start + 64 * 1024])
    await asyncio.sleep(3600)
    return response


def _gzip_bomb(size: int) -> bytes:
    """A JSON object padded with spaces to about `size` bytes, gzipped: 1/1000 of that."""
    return _gzip_then(b'{"pad": "', b" ", size >> 20)


def _sse_flood(events: bytes, size: int) -> bytes:
    """Whole events (flushed, so they arrive at once), then about `size` bytes of one
    `data:` line that never ends."""
    return _gzip_then(events + b"data: ", b"x", size >> 20)


def _gzip_then(prefix: bytes, byte: bytes, mebibytes: int) -> bytes:
    packer = zlib.compressobj(6, wbits=31)
    return packer.compress(prefix) + packer.flush(zlib.Z_SYNC_FLUSH) + _deflated(byte) * mebibytes


@functools.lru_cache(maxsize=4)
def _deflated(byte: bytes) -> bytes:
    """A MiB of one byte as deflate blocks that refer to nothing before them and do not end
    the stream: any number of copies may follow any flushed deflate stream."""
    packer = zlib.compressobj(6, wbits=-15)
    return packer.compress(byte * (1 << 20)) + packer.flush(zlib.Z_SYNC_FLUSH)


def _json(obj: dict[str, Any], pad: bool = False) -> web.Response:
    body = orjson.dumps(obj)
    if pad:  # pretty-printed, with whitespace around it, as some servers answer
        body = b"\n  " + orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n"
    return web.Response(body=body, content_type="application/json")


def _reply(body: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    if body.get("tools") and body.get("tool_choice") != "none":
        tool = body["tools"][0]["function"]
        return "", {
            "id": "call_mock1",
            "type": "function",
            "function": {"name": tool["name"], "arguments": '{"location": "Paris"}'},
        }
    response_format = body.get("response_format") or {}
    if response_format.get("type") in ("json_object", "json_schema"):
        return '{"ok": true}', None
    last = body["messages"][-1]
    content = last.get("content")
    if isinstance(content, list):
        kinds = [part.get("type") for part in content]
        texts = [part.get("text", "") for part in content if part.get("type") == "text"]
        content = " ".join(texts) + f" [parts: {','.join(kinds)}]"
    return f"Hello from mock: {content}", None


def _split(text: str, count: int | None) -> list[str]:
    if count is not None:
        return [f"t{i} " for i in range(count)]
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _usage(body: dict[str, Any], text: str) -> dict[str, int]:
    prompt = len(orjson.dumps(body.get("messages") or body.get("prompt") or "")) // 4
    completion = max(1, len(text.split()))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _chat_chunk(body: dict[str, Any], word: str | None, *, first: bool = False,
                finish: str | None = None, usage: dict[str, int] | None = None,
                tool_call: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body["model"],
        "system_fingerprint": "fp_mock",
        "choices": [],
    }
    if usage is not None:
        chunk["usage"] = usage
        return chunk
    delta: dict[str, Any] = {}
    if first:
        delta["role"] = "assistant"
    if tool_call is not None:
        delta["tool_calls"] = [{"index": 0, **tool_call}]
    elif word is not None:
        delta["content"] = word
    chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    if (body.get("stream_options") or {}).get("include_usage"):
        chunk["usage"] = None
    return chunk


def _completion_chunk(body: dict[str, Any], word: str | None, *, first: bool = False,
                      finish: str | None = None, usage: dict[str, int] | None = None,
                      tool_call: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "cmpl-mock",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [],
    }
    if usage is not None:
        chunk["usage"] = usage
        return chunk
    chunk["choices"] = [{"index": 0, "text": word or "", "logprobs": None,
                         "finish_reason": finish}]
    return chunk
