"""A fake Anthropic upstream: a real aiohttp server on loopback, in its own thread, speaking
the Messages API's wire format (JSON answers, SSE with every event type, error bodies, 529) and
misbehaving on request. It checks `x-api-key` and `anthropic-version`, and records what it got.

The sidecar translates the client's body, so a test cannot steer this server with a field of
its own: it writes a user text that starts with `mock:` and a JSON object instead:
    text                the answer's text (default "echo: " and the last user text)
    tools               answer with this many calls of the request's first tool (after a
                        line of text, so block and tool indices differ)
    thinking            a thinking block first (with thinking and signature deltas)
    stop_reason         this stop reason instead of the natural one
    usage               usage fields to report instead of the defaults
    status, type        answer this error (with `fail_first`: only the first N times, counted
                        per `key`); `retry_after` adds that header; `echo_key` quotes the
                        x-api-key received in the error's message
    error_event         a stream: after the first text delta, an `error` event (overloaded)
    error_first         a stream: an `error` event right after message_start
    events              a stream: these events' data (objects, sent as they are) after the
                        first text delta
A count (`/v1/messages/count_tokens`) answers the request's length in bytes over three.
    break_after         a stream: drop the connection after this many events
    no_stop             a stream: end without message_stop
    delay_s             a stream: wait this long between events
"""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from tests.support.loopback import ThreadedServer

ANTHROPIC_KEY = "sk-ant-mock-0123456789abcdefghij"
VERSION = "2023-06-01"
USAGE = {"input_tokens": 11, "output_tokens": 0, "cache_creation_input_tokens": 5,
         "cache_read_input_tokens": 7}


@dataclass
class Seen:
    path: str
    headers: CIMultiDict[str]
    body: dict[str, Any]


class AnthropicMock(ThreadedServer):
    def __init__(self, key: str = ANTHROPIC_KEY) -> None:
        super().__init__()
        self.key = key
        self.requests: list[Seen] = []
        self.probes: list[CIMultiDict[str]] = []  # the headers of each GET /v1/models
        self.aborted = threading.Event()  # a stream's reader went away before its end
        self._counters: dict[str, int] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:  # type: ignore[override]
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_get("/v1/models", self._models)
        super().start(app, handler_cancellation=True)

    def reset(self) -> None:
        self.requests.clear()
        self.probes.clear()
        self.aborted.clear()
        self._counters.clear()

    def count(self, key: str) -> int:
        return self._counters.get(key, 0)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self.probes.append(request.headers.copy())
        refused = self._check(request)
        return refused or web.json_response({"data": [{"type": "model", "id": "claude-test"}]})

    def _check(self, request: web.Request) -> web.Response | None:
        if request.headers.get("x-api-key") != self.key:
            return _error(401, "authentication_error", "invalid x-api-key")
        if request.headers.get("anthropic-version") != VERSION:
            return _error(400, "invalid_request_error", "anthropic-version: header is required")
        return None

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        """A count that tells whose it is: the request's bytes over three."""
        raw = await request.read()
        self.requests.append(Seen(request.path, request.headers.copy(), orjson.loads(raw)))
        refused = self._check(request)
        return refused or web.json_response({"input_tokens": len(raw) // 3})

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.requests.append(Seen(request.path, request.headers.copy(), body))
        mock = _directives(body)
        refused = self._check(request)
        if refused is not None:
            return refused
        if mock.get("status"):
            key = str(mock.get("key", "default"))
            self._counters[key] = self._counters.get(key, 0) + 1
            first = mock.get("fail_first")
            if first is None or self._counters[key] <= int(first):
                words = "mock error" + (
                    f" for key {request.headers.get('x-api-key')}" if mock.get("echo_key")
                    else "")
                headers = {} if mock.get("retry_after") is None else {
                    "retry-after": str(mock["retry_after"])}
                return _error(int(mock["status"]), str(mock.get("type", "api_error")), words,
                              headers)
        blocks = _blocks(body, mock)
        usage = {**USAGE, **(mock.get("usage") or {})}
        usage["output_tokens"] = usage["output_tokens"] or sum(
            len(str(b.get("text", b.get("input", "")))) for b in blocks) // 4 + 1
        reason = mock.get("stop_reason") or (
            "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn")
        message = {"id": "msg_mock01", "type": "message", "role": "assistant",
                   "model": body["model"], "content": blocks, "stop_reason": reason,
                   "stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            return web.json_response(message)
        try:
            return await _stream(request, message, mock)
        except (asyncio.CancelledError, ConnectionResetError):
            self.aborted.set()
            raise


def _content(turn: dict[str, Any]) -> list[dict[str, Any]]:
    """A turn's blocks; a string is one text block, as Anthropic reads it."""
    content = turn["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _directives(body: dict[str, Any]) -> dict[str, Any]:
    """The directives of the last turn (a tool loop's next turn asks for nothing odd)."""
    turns = body.get("messages") or ()
    for block in _content(turns[-1]) if turns else ():
        text = block.get("text", "") if block.get("type") == "text" else ""
        if text.startswith("mock:"):
            found: dict[str, Any] = orjson.loads(text[5:])
            return found
    return {}


def _last_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or ()):
        for block in reversed(_content(message)):
            if block.get("type") == "text":
                return str(block["text"])
            if block.get("type") == "tool_result":
                return f"result {block.get('content', '')}"
    return ""


def _blocks(body: dict[str, Any], mock: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if mock.get("thinking"):
        blocks.append({"type": "thinking", "thinking": "Let me think.", "signature": "sig"})
    if mock.get("tools"):
        tool = body["tools"][0]["name"]
        blocks.append({"type": "text", "text": "Let me look."})
        for i in range(int(mock["tools"])):
            blocks.append({"type": "tool_use", "id": f"toolu_{i}", "name": tool,
                           "input": {"city": ["Oslo", "Lima", "Pune"][i % 3], "n": i}})
        return blocks
    blocks.append({"type": "text", "text": mock.get("text") or f"echo: {_last_text(body)}"})
    return blocks


def _error(status: int, kind: str, message: str,
           headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": kind, "message": message}},
                             status=status, headers=headers)


def _events(message: dict[str, Any], mock: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The stream of one message, as Anthropic sends it."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None,
             "usage": {**usage, "output_tokens": 1}}
    events: list[tuple[str, dict[str, Any]]] = [("message_start", {"message": start}),
                                                ("ping", {})]
    if mock.get("error_first"):
        return [*events, ("error", {"error": {"type": "overloaded_error",
                                              "message": "Overloaded"}})]
    for index, block in enumerate(message["content"]):
        kind = block["type"]
        if kind == "text":
            events.append(("content_block_start", {"index": index, "content_block": {
                "type": "text", "text": ""}}))
            words = block["text"].split(" ")
            for i, word in enumerate(words):
                piece = word if i == 0 else " " + word
                events.append(("content_block_delta", {"index": index, "delta": {
                    "type": "text_delta", "text": piece}}))
                if i == 0:
                    events += [(str(data.get("type")), data) for data in mock.get("events", ())]
                if mock.get("error_event") and len(events) >= 4:
                    events.append(("error", {"error": {"type": "overloaded_error",
                                                       "message": "Overloaded"}}))
                    return events
        elif kind == "thinking":
            events.append(("content_block_start", {"index": index, "content_block": {
                "type": "thinking", "thinking": ""}}))
            events.append(("content_block_delta", {"index": index, "delta": {
                "type": "thinking_delta", "thinking": block["thinking"]}}))
            events.append(("content_block_delta", {"index": index, "delta": {
                "type": "signature_delta", "signature": block["signature"]}}))
        else:
            events.append(("content_block_start", {"index": index, "content_block": {
                "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}}))
            # Anthropic's first input delta is often empty; then the JSON in pieces.
            arguments = orjson.dumps(block["input"]).decode()
            third = math.ceil(len(arguments) / 3)
            for piece in ("", *(arguments[i:i + third] for i in range(0, len(arguments),
                                                                         third))):
                events.append(("content_block_delta", {"index": index, "delta": {
                    "type": "input_json_delta", "partial_json": piece}}))
        events.append(("content_block_stop", {"index": index}))
    events.append(("message_delta", {"delta": {"stop_reason": message["stop_reason"],
                                               "stop_sequence": None},
                                     "usage": {"output_tokens": usage["output_tokens"]}}))
    if not mock.get("no_stop"):
        events.append(("message_stop", {}))
    return events


async def _stream(request: web.Request, message: dict[str, Any],
                  mock: dict[str, Any]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    delay = float(mock.get("delay_s") or 0)
    for sent, (kind, data) in enumerate(_events(message, mock)):
        if mock.get("break_after") is not None and sent >= int(mock["break_after"]):
            assert request.transport is not None
            request.transport.abort()
            return response
        frame = b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(
            {"type": kind, **data}) + b"\n\n"
        await response.write(frame)
        if delay:
            await asyncio.sleep(delay)
    await response.write_eof()
    return response
