"""The Responses front door: `POST /v1/responses`, JSON or the Responses SSE stream (each
event named by its type, no `[DONE]`). It parses and validates the request and writes the
answer; the gateway decides the target, and sidecar/responses_crossing.py passes the bytes
through or translates them."""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
from aiohttp import web

from sidecar.api.http import read_body
from sidecar.api.openai_writer import write_json
from sidecar.api.sse_writer import SseDialect, write_sse
from sidecar.appkeys import CONTEXT, GATEWAY
from sidecar.errors import SidecarError
from sidecar.exchange import Exchange
from sidecar.protocol.requests import decode_body, validate
from sidecar.protocol.sse import HEARTBEAT as HEARTBEAT_FRAME
from sidecar.responses_crossing import RESPONSES

routes = web.RouteTableDef()

# An event's type, read from the head of its JSON without parsing the whole event.
_TYPE = re.compile(rb'"type"\s*:\s*"([a-z_.]{1,64})"')


class ResponsesRequest(msgspec.Struct):
    """What the path itself needs of a Responses request; the rest is the target's."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    stream: bool = False
    max_output_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None


@routes.post("/v1/responses")
async def create_response(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    payload = decode_body(body)
    parsed = validate(payload, ResponsesRequest)
    exchange = Exchange("responses", body, payload, parsed.model, request[CONTEXT],
                        request.headers, protocol=RESPONSES)
    exchange.stream = parsed.stream
    exchange.max_output_tokens = parsed.max_output_tokens
    answer = await request.app[GATEWAY].open(exchange)
    if not exchange.stream:
        return write_json(request, answer)
    return await write_sse(request, answer, RESPONSES_SSE)


def event_frame(data: bytes) -> bytes:
    """A Responses stream event, named by its type; a heartbeat for an empty item."""
    if not data:
        return HEARTBEAT_FRAME
    found = _TYPE.search(data, 0, 200)
    name = found[1] if found is not None else b"message"
    return b"event: " + name + b"\ndata: " + data + b"\n\n"


def error_frame(error: SidecarError) -> bytes:
    body = error.body()["error"]
    return event_frame(msgspec.json.encode({"type": "error", **(body if isinstance(body, dict)
                                                                else {})}))


RESPONSES_SSE = SseDialect(event_frame, error_frame)  # no last word: response.completed ends it
