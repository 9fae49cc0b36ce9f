"""A fake OpenAI-compatible upstream that serves the Responses API (`POST /v1/responses`): a
real aiohttp server on loopback, in its own thread, answering a Response object or the
Responses SSE stream (`event:` lines named by type, no `[DONE]`), with the input's text echoed.
An input that starts with "slow" is streamed one event a second. Every request's raw bytes are
kept in `bodies`, and `aborted` is set when the sidecar leaves a stream before its end."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import orjson
from aiohttp import web

from tests.support.loopback import ThreadedServer


class ResponsesUpstream(ThreadedServer):
    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.aborted = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:  # type: ignore[override]
        app = web.Application()
        app.router.add_post("/v1/responses", self._responses)
        super().start(app, handler_cancellation=True)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.bodies.append(raw)
        body: dict[str, Any] = orjson.loads(raw)
        given = body.get("input")
        text = "upstream says: " + (given if isinstance(given, str) else "items")
        done = _response(body["model"], text, "completed")
        if not body.get("stream"):
            return web.Response(body=orjson.dumps(done), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = [
            {"type": "response.created", "response": _response(body["model"], "", "in_progress")},
            {"type": "response.output_text.delta", "item_id": "msg_up", "output_index": 0,
             "content_index": 0, "delta": text},
            {"type": "response.completed", "response": done},
        ]
        slow = isinstance(given, str) and given.startswith("slow")
        try:
            for n, event in enumerate(events):
                event["sequence_number"] = n
                await response.write(b"event: " + event["type"].encode() + b"\ndata: "
                                     + orjson.dumps(event) + b"\n\n")
                if slow:
                    await asyncio.sleep(1.0)
        except (asyncio.CancelledError, ConnectionResetError):
            self.aborted.set()
            raise
        await response.write_eof()
        return response


def _response(model: str, text: str, status: str) -> dict[str, Any]:
    output = [{"id": "msg_up", "type": "message", "status": status, "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}] \
        if text else []
    return {"id": "resp_upstream", "object": "response", "created_at": 1, "status": status,
            "model": model, "output": output, "error": None, "incomplete_details": None,
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}
            if status == "completed" else None}
