"""The Anthropic front door: `POST /v1/messages` and `POST /v1/messages/count_tokens`. It
parses and validates Messages requests and writes Messages answers; the gateway decides where
each answer comes from (a Messages upstream gets the client's bytes, any other target the
request translated). Errors on this door are in Anthropic's shape (the edge middleware asks
`speaks_anthropic`)."""

from __future__ import annotations

from aiohttp import web

from sidecar.api.anthropic_writer import write_json, write_stream
from sidecar.api.http import read_body
from sidecar.appkeys import CONTEXT, GATEWAY
from sidecar.exchange import ANTHROPIC, Exchange
from sidecar.protocol.anthropic_requests import CountTokensRequest, MessagesRequest
from sidecar.protocol.requests import decode_body, validate

routes = web.RouteTableDef()
PREFIX = "/v1/messages"


def speaks_anthropic(path: str) -> bool:
    """The request came through this door: its errors, and its key header, are
    Anthropic's."""
    return path.startswith(PREFIX)


@routes.post(PREFIX)
async def messages(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    payload = decode_body(body)
    parsed = validate(payload, MessagesRequest)
    exchange = Exchange("messages", body, payload, parsed.model, request[CONTEXT],
                        request.headers, ANTHROPIC)
    exchange.stream = parsed.stream
    exchange.include_usage = True
    exchange.max_output_tokens = parsed.max_tokens
    answer = await request.app[GATEWAY].open(exchange)
    if not exchange.stream:
        return write_json(request, answer)
    return await write_stream(request, answer)


@routes.post(f"{PREFIX}/count_tokens")
async def count_tokens(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    payload = decode_body(body)
    parsed = validate(payload, CountTokensRequest)
    exchange = Exchange("messages/count_tokens", body, payload, parsed.model,
                        request[CONTEXT], request.headers, ANTHROPIC)
    exchange.cacheable = False  # cheap, and its answer is not a message
    answer = await request.app[GATEWAY].open(exchange)
    return write_json(request, answer)
