"""An upstream that speaks Anthropic's Messages API (Claude) behind the OpenAI API: the
client's chat body is translated through the internal form into a Messages request, and the
answer, whole or streamed, back into OpenAI's answer or chunks, so the path and the front door
see an OpenAI backend. The transport (timeouts, retries before the first byte, size limits,
scrubbing) is every HTTP upstream's: sidecar/backends/http_upstream.py."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from sidecar.backends.base import HEARTBEAT, Call
from sidecar.backends.http_upstream import HttpUpstream
from sidecar.errors import InvalidRequest, UpstreamError
from sidecar.protocol.anthropic import StreamState, answer_events, request_to_anthropic
from sidecar.protocol.chat import ChatRequest, StreamFailure, Usage
from sidecar.protocol.openai_chat import ChunkWriter, answer_json, request_from_openai
from sidecar.settings import AnthropicProviderSettings, Secret
from sidecar.transport import UpstreamClient

# OpenAI fields a Messages request cannot carry, refused rather than quietly dropped: the
# client would get an answer that ignores what it asked for.
# Each with what it says and the values that ask for nothing.
_UNSUPPORTED: dict[str, tuple[str, tuple[object, ...]]] = {
    "n": ("several choices", (1,)), "logprobs": ("logprobs", (False,)),
    "top_logprobs": ("logprobs", (0,)), "audio": ("audio output", ()),
    "prediction": ("predicted outputs", ())}


class AnthropicUpstream(HttpUpstream):
    stream_end = "message_stop"

    def __init__(self, name: str, settings: AnthropicProviderSettings, api_key: Secret | None,
                 client: UpstreamClient, heartbeat_s: float) -> None:
        super().__init__(name, settings, settings.base_url, api_key, client, heartbeat_s)
        self._headers["anthropic-version"] = settings.anthropic_version
        self._default_max_tokens = settings.default_max_tokens

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"x-api-key": key}

    def path(self, call: Call) -> str:
        return f"{self._base}/v1/messages"

    def ends(self, data: bytes) -> bool:
        # The event's type, as Anthropic writes it; a string inside the text cannot match,
        # since its quotes would be escaped.
        return b'"message_stop"' in data

    async def probe(self) -> bool:
        """GET {base_url}/v1/models: any answer below 500 means the upstream is there."""
        return await self._probe(f"{self._base}/v1/models")

    async def complete(self, call: Call) -> bytes:
        request, sent = self._translate(call)
        body = await super().complete(sent)
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamError(
                f"The upstream `{self.name}` answered with something that is not JSON.") from None
        if answer.get("type") == "error":
            raise UpstreamError(f"The upstream `{self.name}` answered with an error.")
        head = self._head(answer.get("id"), answer.get("model") or request.model,
                          "chat.completion")
        return answer_json(head, True, answer_events(answer))

    async def stream(self, call: Call) -> AsyncGenerator[bytes, None]:
        request, sent = self._translate(call)
        state = StreamState()  # this stream's own: concurrent streams never share one
        chunks: ChunkWriter | None = None
        events = super().stream(sent)
        try:
            async for data in events:
                if data == HEARTBEAT:
                    yield data
                    continue
                for event in state.feed(data):
                    if isinstance(event, StreamFailure):
                        raise event.error
                    if chunks is None:
                        # The role chunk waits for the answer's first word: an error event
                        # before it (overloaded, at once) still lets another target answer.
                        chunks = self._writer(state, request)
                        yield chunks.role()
                    if isinstance(event, Usage) and not request.include_usage:
                        continue
                    yield chunks.event(event)
        finally:
            await events.aclose()

    def _translate(self, call: Call) -> tuple[ChatRequest, Call]:
        """The client's chat body as the internal form, and the call that carries it as a
        Messages request. Refused (400) before any byte goes upstream when it cannot be."""
        if call.endpoint != "chat/completions":
            raise InvalidRequest(
                f"The Anthropic upstream `{self.name}` serves chat completions only, not "
                f"{call.endpoint}.", code="unsupported_endpoint")
        payload = orjson.loads(call.body)
        _refuse_unsupported(payload)
        request = request_from_openai(payload)
        body = orjson.dumps(request_to_anthropic(request, self._default_max_tokens))
        return request, dataclasses.replace(call, body=body)

    def _writer(self, state: StreamState, request: ChatRequest) -> ChunkWriter:
        head = self._head(state.id, state.model or request.model, "chat.completion.chunk")
        if request.include_usage:
            head["usage"] = None  # as OpenAI's chunks say, until the last one
        return ChunkWriter(head, chat=True)

    def _head(self, message_id: object, model: object, kind: str) -> dict[str, Any]:
        return {"id": f"chatcmpl-{message_id or 'anthropic'}", "object": kind,
                "created": int(time.time()), "model": str(model)}


def _refuse_unsupported(payload: dict[str, Any]) -> None:
    for name, (what, off) in _UNSUPPORTED.items():
        value = payload.get(name)
        if value is None or (value in off and type(value) is type(off[0])):
            continue
        raise InvalidRequest(f"This model's provider (Anthropic) does not support {what} "
                             f"(`{name}`).", param=name, code="unsupported_parameter")
    response_format = payload.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
        raise InvalidRequest(
            "This model's provider (Anthropic) does not support structured output "
            "(`response_format`).", param="response_format", code="unsupported_parameter")
