"""The OpenAI endpoints: parse and validate once, pick a target, hand over to its backend, and
write what comes back as JSON or as an SSE stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from sidecar.api.http import JSON, json_bytes
from sidecar.backends.base import Backend, Call
from sidecar.errors import ModelNotFound, SidecarError
from sidecar.keys import CONTEXT, GATEWAY
from sidecar.observability.timing import Timing
from sidecar.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Sampling,
    decode_body,
    validate,
)
from sidecar.protocol.sse import DONE_FRAME
from sidecar.protocol.sse import HEARTBEAT as HEARTBEAT_FRAME

routes = web.RouteTableDef()

_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    names = request.app[GATEWAY].routes.names()
    return web.Response(
        body=orjson.dumps({"object": "list", "data": [_model_card(n) for n in names]}),
        content_type=JSON,
    )


@routes.get("/v1/models/{model:.+}")
async def retrieve_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if request.app[GATEWAY].routes.get(name) is None:
        raise ModelNotFound(f"The model `{name}` does not exist.", param="model")
    return web.Response(body=orjson.dumps(_model_card(name)), content_type=JSON)


_STARTED = int(time.time())


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "llm-sidecar"}


Schema = type[ChatCompletionRequest] | type[CompletionRequest] | type[EmbeddingRequest]


async def proxy(endpoint: str, schema: Schema, request: web.Request) -> web.StreamResponse:
    """The handler of every proxied endpoint (bound to one with functools.partial)."""
    body = await request.read()
    payload = decode_body(body)
    parsed = validate(payload, schema)
    gateway = request.app[GATEWAY]
    route = gateway.routes.get(parsed.model)
    if route is None:
        raise ModelNotFound(
            f"The model `{parsed.model}` does not exist or you do not have access to it.",
            param="model",
        )
    target = route.choose()
    if target.model != parsed.model:
        payload["model"] = target.model
        body = orjson.dumps(payload)
    context = request[CONTEXT]
    fields = context.fields
    fields["model"] = parsed.model
    fields["target"] = target.label
    call = Call(endpoint, body, context.request_id, context.timing)
    backend = gateway.backends[target.provider]
    extra = {"X-Sidecar-Target": target.label}
    if isinstance(parsed, Sampling) and parsed.stream:
        fields["stream"] = True
        return await _stream(request, backend, call, extra)
    response = json_bytes(request, await backend.complete(call))
    response.headers.update(extra)
    return response


routes.post("/v1/chat/completions")(partial(proxy, "chat/completions", ChatCompletionRequest))
routes.post("/v1/completions")(partial(proxy, "completions", CompletionRequest))
routes.post("/v1/embeddings")(partial(proxy, "embeddings", EmbeddingRequest))


async def _stream(
    request: web.Request, backend: Backend, call: Call, extra: dict[str, str]
) -> web.StreamResponse:
    events = backend.stream(call)
    try:
        # Nothing is sent before the first event: until then an error is a plain JSON answer
        # and the backend may still retry.
        try:
            first: bytes | None = await anext(events)
        except StopAsyncIteration:
            first = None
        response = await _open_stream(request, call.timing, extra)
        try:
            if first is not None:
                await response.write(_frame(first))
                await _pump(response, events)
            await response.write(DONE_FRAME)
        except SidecarError as exc:
            # Past the first byte the status is spent: say what happened in the stream and
            # end it without [DONE], so the client knows the answer is incomplete.
            request[CONTEXT].fields["stream_error"] = exc.code or exc.type
            await response.write(b"data: " + exc.to_json() + b"\n\n")
        await response.write_eof()
        return response
    finally:
        await events.aclose()


def _frame(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n" if data else HEARTBEAT_FRAME


async def _pump(response: web.StreamResponse, events: AsyncIterator[bytes]) -> None:
    write = response.write
    async for data in events:
        await write(_frame(data))


async def _open_stream(
    request: web.Request, timing: Timing, extra: dict[str, str]
) -> web.StreamResponse:
    response = web.StreamResponse(headers=_SSE_HEADERS)
    response.headers.update(extra)
    response.headers["X-Request-Id"] = request[CONTEXT].request_id
    response.headers["X-Sidecar-Overhead-Ms"] = f"{timing.overhead_ms():.3f}"
    await response.prepare(request)
    return response
