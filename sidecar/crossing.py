"""Where the front door and the target speak different protocols: the request is read into the
internal form (sidecar/protocol/chat.py) and written in the target's protocol, and the answer,
whole or streamed, is read back as events and written in the front door's. A stream opens only
once the answer's first word came, so that an error the target sends at once (overloaded)
still lets another target answer. Each stream's translation state is its own."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from sidecar.backends.base import HEARTBEAT, Backend, Call
from sidecar.backends.upstream_answers import answer_object
from sidecar.errors import InvalidRequest, UpstreamError
from sidecar.exchange import ANTHROPIC, OPENAI, Answer, Exchange, opened
from sidecar.protocol.anthropic import StreamState, answer_events, request_to_anthropic
from sidecar.protocol.anthropic_messages import EventWriter, message_json, request_from_anthropic
from sidecar.protocol.chat import ChatRequest, StreamFailure, Usage
from sidecar.protocol.openai_chat import (
    ChunkWriter,
    answer_json,
    events_from_answer,
    events_from_chunk,
    request_from_openai,
    request_to_openai,
)
from sidecar.responses_crossing import RESPONSES, cross_responses

# OpenAI fields a Messages request cannot carry, refused rather than quietly dropped: the
# client would get an answer that ignores what it asked for.
# Each with what it says and the values that ask for nothing.
_UNSUPPORTED: dict[str, tuple[str, tuple[object, ...]]] = {
    "n": ("several choices", (1,)), "logprobs": ("logprobs", (False,)),
    "top_logprobs": ("logprobs", (0,)), "audio": ("audio output", ()),
    "prediction": ("predicted outputs", ())}


async def cross(backend: Backend, call: Call, exchange: Exchange, model: str) -> Answer:
    """The target's answer to the exchange, in the front door's protocol; `call` is the
    exchange's call without its body, `model` the target's model."""
    if exchange.protocol == OPENAI and backend.protocol == ANTHROPIC:
        return await _claude_for_openai(backend, call, exchange, model)
    if exchange.protocol == ANTHROPIC and backend.protocol == OPENAI:
        return await _openai_for_claude(backend, call, exchange, model)
    if exchange.protocol == RESPONSES:
        return await cross_responses(backend, call, exchange, model, _claude_for_openai)
    raise InvalidRequest(f"A {exchange.protocol} request cannot be sent to a "
                         f"{backend.protocol} target.", code="unsupported_endpoint")


def _chat(exchange: Exchange) -> ChatRequest:
    """The exchange in the internal form, read once however many targets it is sent to."""
    if exchange.chat is None:
        exchange.chat = request_from_openai(exchange.payload) if exchange.protocol == OPENAI \
            else request_from_anthropic(exchange.payload)
    return exchange.chat


# An OpenAI client, an Anthropic target.

async def _claude_for_openai(backend: Backend, call: Call, exchange: Exchange, model: str
                             ) -> Answer:
    if exchange.endpoint != "chat/completions":
        raise InvalidRequest(
            f"This model's provider (Anthropic) serves chat completions only, not "
            f"{exchange.endpoint}.", code="unsupported_endpoint")
    _refuse_unsupported(exchange.payload)
    request = dataclasses.replace(_chat(exchange), model=model)
    # An Anthropic backend always has a default (its provider's `default_max_tokens`).
    limit = backend.default_max_tokens or 4096
    body = orjson.dumps(request_to_anthropic(request, limit))
    sent = dataclasses.replace(call, endpoint="messages", body=body)
    if not exchange.stream:
        answer = answer_object(await backend.complete(sent), backend.name)
        if answer.get("type") == "error":
            raise UpstreamError(f"The upstream `{backend.name}` answered with an error.")
        head = _openai_head(answer.get("id"), answer.get("model") or model, "chat.completion")
        return Answer(answer_json(head, True, answer_events(answer)))
    return await opened(openai_chunks_of(backend.stream(sent), request))


async def openai_chunks_of(events: AsyncGenerator[bytes, None], request: ChatRequest
                  ) -> AsyncGenerator[bytes, None]:
    """A Messages stream as OpenAI's chunks."""
    state = StreamState()  # this stream's own: concurrent streams never share one
    chunks: ChunkWriter | None = None
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
                    head = _openai_head(state.id, state.model or request.model,
                                        "chat.completion.chunk")
                    if request.include_usage:
                        head["usage"] = None  # as OpenAI's chunks say, until the last one
                    chunks = ChunkWriter(head, chat=True)
                    yield chunks.role()
                if isinstance(event, Usage) and not request.include_usage:
                    continue
                yield chunks.event(event)
    finally:
        await events.aclose()


def _openai_head(message_id: object, model: object, kind: str) -> dict[str, Any]:
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


# An Anthropic client, an OpenAI-compatible target (an upstream or a local engine).

async def _openai_for_claude(backend: Backend, call: Call, exchange: Exchange, model: str
                             ) -> Answer:
    request = dataclasses.replace(_chat(exchange), model=model)
    if exchange.endpoint == "messages/count_tokens":
        # OpenAI's API has no count: the estimate the token budget uses, of the prompt as
        # this target would get it.
        prompt = orjson.dumps(request_to_openai(request))
        return Answer(orjson.dumps({"input_tokens": len(prompt) // 4}), None, None, ANTHROPIC)
    sent = dataclasses.replace(call, endpoint="chat/completions",
                               body=orjson.dumps(request_to_openai(request)))
    if not exchange.stream:
        answer = answer_object(await backend.complete(sent), backend.name)
        head = _anthropic_head(answer.get("id"), answer.get("model") or model)
        return Answer(message_json(head, events_from_answer(answer)), None, None, ANTHROPIC)
    return await opened(messages_events_of(backend.stream(sent), model), ANTHROPIC)


async def messages_events_of(events: AsyncGenerator[bytes, None], model: str
                    ) -> AsyncGenerator[bytes, None]:
    """OpenAI's chunks as a Messages stream (message_stop excluded: the writer's)."""
    writer: EventWriter | None = None  # this stream's own
    try:
        async for data in events:
            if data == HEARTBEAT:
                if writer is None:
                    # A target that is slow to say its first word: the message starts, so
                    # that the pings keeping the connection alive come after message_start.
                    writer = EventWriter(_anthropic_head(None, model))
                    yield writer.start()
                yield data
                continue
            for event in events_from_chunk(data):
                if isinstance(event, StreamFailure):
                    raise event.error
                if writer is None:
                    # message_start waits for the answer's first word (see openai_chunks_of).
                    head = orjson.loads(data)
                    writer = EventWriter(_anthropic_head(head.get("id"),
                                                         head.get("model") or model))
                    yield writer.start()
                for out in writer.event(event):
                    yield out
        if writer is None:  # a stream that said nothing is still a message
            writer = EventWriter(_anthropic_head(None, model))
            yield writer.start()
        for out in writer.end():
            yield out
    finally:
        await events.aclose()


def _anthropic_head(answer_id: object, model: object) -> dict[str, Any]:
    name = str(answer_id or uuid.uuid4().hex)
    return {"id": name if name.startswith("msg_") else f"msg_{name}", "model": str(model)}
