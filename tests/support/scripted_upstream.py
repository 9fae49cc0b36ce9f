"""An OpenAI-compatible upstream on loopback that streams exactly the events a test scripts,
for answers the mock upstream never gives: an error event, data that is not JSON or not an
object, a stream that says [DONE] without a finish_reason.

A streaming request's `script` is a list of strings, each sent as one event's `data`, then
`[DONE]`; a request translated from another protocol, which carries no field of its own,
gives it as its last message's text: `script:` and the list as JSON. A JSON request is
answered, after `delay_s`, with a text that numbers the call, so that a test can tell whose
answer a client got."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from tests.support.loopback import ThreadedServer


class ScriptedUpstream(ThreadedServer):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:  # type: ignore[override]
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        super().start(app)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.calls += 1
        call = self.calls
        if not body.get("stream"):
            await asyncio.sleep(float(body.get("delay_s") or 0))
            return web.json_response({
                "id": f"chatcmpl-{call}", "object": "chat.completion", "created": 1,
                "model": "scripted", "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": f"answer {call}"},
                    "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for data in _script(body):
            await response.write(b"data: " + str(data).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def chat_chunk(content: str | None = None, finish: str | None = None) -> str:
    """One chat.completion.chunk event as an upstream sends it."""
    delta = {} if content is None else {"content": content}
    return orjson.dumps({
        "id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1,
        "model": "scripted", "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}]}).decode()


def _script(body: dict[str, Any]) -> list[str]:
    if "script" in body:
        return list(body["script"])
    text = body["messages"][-1]["content"]
    assert isinstance(text, str) and text.startswith("script:"), text
    return list(orjson.loads(text[len("script:"):]))


def tool_chunk(index: int, call_id: str | None = None, name: str | None = None,
               arguments: str = "") -> str:
    """A chunk carrying one tool call's delta."""
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id is not None:
        call.update(id=call_id, type="function")
        call["function"]["name"] = name
    return orjson.dumps({
        "id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1,
        "model": "scripted", "choices": [{"index": 0, "delta": {"tool_calls": [call]},
                                          "logprobs": None, "finish_reason": None}]}).decode()
