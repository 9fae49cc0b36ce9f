"""The OpenAI front door: chat completions, completions, embeddings and the model list. It
parses and validates OpenAI's requests and writes OpenAI's answers; the gateway decides where
each answer comes from."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from sidecar.api.http import JSON, read_body
from sidecar.api.openai_writer import write_json, write_stream
from sidecar.appkeys import CONTEXT, GATEWAY
from sidecar.errors import ModelNotFound
from sidecar.exchange import Exchange
from sidecar.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Sampling,
    decode_body,
    validate,
)

routes = web.RouteTableDef()

@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    principal = request[CONTEXT].principal
    names = [n for n in request.app[GATEWAY].routes.names() if principal.may_use(n)]
    return web.Response(
        body=orjson.dumps({"object": "list", "data": [_model_card(n) for n in names]}),
        content_type=JSON,
    )


@routes.get("/v1/models/{model:.+}")
async def retrieve_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if request.app[GATEWAY].routes.get(name) is None or not request[CONTEXT].principal.may_use(
        name
    ):
        raise ModelNotFound(f"The model `{name}` does not exist.", param="model")
    return web.Response(body=orjson.dumps(_model_card(name)), content_type=JSON)


_STARTED = int(time.time())


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "llm-sidecar"}


Schema = type[ChatCompletionRequest] | type[CompletionRequest] | type[EmbeddingRequest]


async def proxy(endpoint: str, schema: Schema, request: web.Request) -> web.StreamResponse:
    """The handler of every OpenAI endpoint the path serves (bound to one with
    functools.partial): parse and validate, hand the request to the gateway, write its answer."""
    body = await read_body(request)
    payload = decode_body(body)
    parsed = validate(payload, schema)
    context = request[CONTEXT]
    exchange = Exchange(endpoint, body, payload, parsed.model, context, request.headers)
    if isinstance(parsed, Sampling):
        exchange.stream = parsed.stream
        exchange.include_usage = parsed.stream_options is not None and \
            parsed.stream_options.include_usage
        exchange.max_output_tokens = parsed.max_tokens
        if isinstance(parsed, ChatCompletionRequest) and parsed.max_completion_tokens:
            exchange.max_output_tokens = parsed.max_completion_tokens
        exchange.choices = parsed.n or 1
    else:
        exchange.cacheable = False  # embeddings
    answer = await request.app[GATEWAY].open(exchange)
    if not exchange.stream:
        return write_json(request, answer)
    return await write_stream(request, answer)


routes.post("/v1/chat/completions")(partial(proxy, "chat/completions", ChatCompletionRequest))
routes.post("/v1/completions")(partial(proxy, "completions", CompletionRequest))
routes.post("/v1/embeddings")(partial(proxy, "embeddings", EmbeddingRequest))


