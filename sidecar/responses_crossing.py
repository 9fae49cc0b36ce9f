"""Responses requests on their way to a target. An OpenAI-compatible upstream that serves the
Responses API (`responses = true`) gets the client's bytes, only `model` rewritten; any other
target (a chat-only upstream, Anthropic, the local engine) gets the request read into the
internal form and sent as a chat completion, and its answer, whole or streamed, comes back
written as a Response or as the Responses stream's events."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

import orjson

from sidecar.backends.base import HEARTBEAT, Backend, Call
from sidecar.backends.upstream_answers import answer_object
from sidecar.backends.upstream_openai import OpenAIUpstream
from sidecar.exchange import ANTHROPIC, Answer, Exchange, first_of, opened
from sidecar.protocol.chat import ChatRequest, StreamFailure
from sidecar.protocol.openai_chat import events_from_answer, events_from_chunk, request_to_openai
from sidecar.protocol.responses import ResponseWriter, request_from_responses

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

RESPONSES = "responses"
# The events that end a Responses stream: it has no `[DONE]` after them.
_FINAL = re.compile(rb'"type"\s*:\s*"(?:response\.(?:completed|failed|incomplete)|error)"')


def chat_of(exchange: Exchange) -> ChatRequest:
    """The exchange in the internal form, read once however many targets it is sent to."""
    if exchange.chat is None:
        exchange.chat = request_from_responses(exchange.payload)
    return exchange.chat


async def cross_responses(backend: Backend, call: Call, exchange: Exchange, model: str,
                          to_anthropic: Callable[[Backend, Call, Exchange, str],
                                                 Awaitable[Answer]]) -> Answer:
    """The target's answer to a Responses request, as Responses; `to_anthropic` is the
    OpenAI-for-Anthropic crossing, which answers in OpenAI's chat protocol."""
    if isinstance(backend, OpenAIUpstream) and backend.responses:
        body = exchange.body
        if model != exchange.model:
            exchange.payload["model"] = model
            body = orjson.dumps(exchange.payload)
        sent = dataclasses.replace(call, endpoint="responses", body=body)
        if exchange.stream:
            answer = await opened(until_final(backend.stream(sent)), RESPONSES)
        else:
            answer = Answer(await backend.complete(sent))
        answer.protocol = RESPONSES
        return answer
    request = dataclasses.replace(chat_of(exchange), model=model)
    if backend.protocol == ANTHROPIC:
        # The chat crossing reads the internal form from the exchange, set above.
        chat = await to_anthropic(backend, call, _as_chat(exchange), model)
    else:
        sent = dataclasses.replace(call, endpoint="chat/completions",
                                   body=orjson.dumps(request_to_openai(request)))
        chat = await first_of(backend, sent) if exchange.stream \
            else Answer(await backend.complete(sent))
    if not exchange.stream:
        return Answer(_response_json(chat.body, backend, model), None, None, RESPONSES)
    events = _chunks(chat)
    return await opened(response_events_of(events, model), RESPONSES)


def _as_chat(exchange: Exchange) -> Exchange:
    """A chat completion exchange carrying the same request in the internal form."""
    chat = Exchange("chat/completions", b"", {}, exchange.model, exchange.context,
                    exchange.headers)
    chat.stream = exchange.stream
    chat.chat = exchange.chat
    return chat


def _response_json(raw: bytes, backend: Backend, model: str) -> bytes:
    answer = answer_object(raw, backend.name)
    return ResponseWriter(str(answer.get("model") or model)).response_json(
        events_from_answer(answer))


async def _chunks(answer: Answer) -> AsyncGenerator[bytes, None]:
    """A chat answer's stream, its first event included."""
    try:
        if answer.first is not None:
            yield answer.first
            if answer.events is not None:
                async for data in answer.events:
                    yield data
    finally:
        await answer.close()


async def response_events_of(events: AsyncGenerator[bytes, None], model: str
                             ) -> AsyncGenerator[bytes, None]:
    """OpenAI's chunks as the Responses stream's events."""
    writer = ResponseWriter(model)  # this stream's own
    try:
        for out in writer.start():
            yield out
        async for data in events:
            if data == HEARTBEAT:
                yield data
                continue
            for event in events_from_chunk(data):
                if isinstance(event, StreamFailure):
                    raise event.error
                for out in writer.event(event):
                    yield out
        for out in writer.end():
            yield out
    finally:
        await events.aclose()


async def until_final(events: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """A Responses upstream's stream, ended by its final event rather than by `[DONE]`,
    which the Responses API does not send."""
    try:
        async for data in events:
            yield data
            if _FINAL.search(data, 0, 200):
                return
    finally:
        await events.aclose()
