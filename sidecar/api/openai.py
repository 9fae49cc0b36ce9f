"""The OpenAI endpoints: parse and validate once, pick a target, hand over to its backend, and
write what comes back as JSON or as an SSE stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from sidecar.api.http import JSON, json_bytes
from sidecar.appkeys import CACHE, CACHE_SECRET, CONTEXT, GATEWAY, LIMITER, SETTINGS
from sidecar.backends.base import Call
from sidecar.cache.records import Record, as_chunks, as_json
from sidecar.cache.response_cache import ResponseCache, cache_key, deterministic
from sidecar.errors import ModelNotFound, RequestTimeout, SidecarError, Spillable
from sidecar.gateway import Gateway
from sidecar.observability.timing import Timing
from sidecar.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Sampling,
    decode_body,
    validate,
)
from sidecar.protocol.sse import DONE_FRAME, frame
from sidecar.protocol.sse import HEARTBEAT as HEARTBEAT_FRAME
from sidecar.routing.table import Route, Target
from sidecar.security.jwt import Forbidden

routes = web.RouteTableDef()

_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


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
    """The handler of every proxied endpoint (bound to one with functools.partial)."""
    body = await _read_body(request)
    payload = decode_body(body)
    parsed = validate(payload, schema)
    context = request[CONTEXT]
    if not context.principal.may_use(parsed.model):
        raise Forbidden(f"This token may not use the model `{parsed.model}`.",
                        param="model", code="model_not_allowed")
    gateway = request.app[GATEWAY]
    route = gateway.routes.get(parsed.model)
    if route is None:
        raise ModelNotFound(
            f"The model `{parsed.model}` does not exist or you do not have access to it.",
            param="model",
        )
    context.fields["model"] = parsed.model
    exchange = Exchange(endpoint, body, payload, parsed, route)
    cache = request.app[CACHE] if endpoint != "embeddings" else None
    limiter = request.app[LIMITER]
    tokens = limiter.tokens
    if tokens is None:
        if cache is None:  # the common case, one coroutine deep: reach a target, answer
            return await _respond(request, await _reach(request, gateway, exchange), None)
        return await _cached(request, gateway, exchange, None, cache)
    # The tenant's token budget: the prompt estimate and max_tokens are reserved first and
    # the reservation settled on the usage the answer reports.
    tenant = context.principal.tenant
    reserved = _estimate_tokens(body, parsed, limiter.settings.default_max_tokens)
    budget = limiter.shared_tokens or tokens
    if limiter.shared_tokens is not None:
        await limiter.shared_tokens.take(tenant, reserved)
    else:
        tokens.take(tenant, reserved)
    # What the answer reported, last value wins: -1 once served with usage unknown (then the
    # reservation stands); nothing at all if no target served it (then it all comes back).
    usage: list[int] = []
    try:
        if cache is None:
            return await _respond(request, await _reach(request, gateway, exchange), usage)
        return await _cached(request, gateway, exchange, usage, cache)
    finally:
        used = usage[-1] if usage else 0
        budget.give_back(tenant, reserved - (reserved if used < 0 else used))


class Exchange:
    """One client request on its way to whichever target serves it."""

    __slots__ = ("body", "endpoint", "parsed", "payload", "route")

    def __init__(self, endpoint: str, body: bytes, payload: dict[str, Any],
                 parsed: ChatCompletionRequest | CompletionRequest | EmbeddingRequest,
                 route: Route) -> None:
        self.endpoint = endpoint
        self.body = body
        self.payload = payload
        self.parsed = parsed
        self.route = route

    def body_for(self, target: Target) -> bytes:
        if target.model == self.parsed.model:
            return self.body
        self.payload["model"] = target.model
        return orjson.dumps(self.payload)


class Reached:
    """The target that took a request: its whole answer, or its stream and first event."""

    __slots__ = ("answer", "events", "first", "spilled", "target", "timing", "tried")

    def __init__(self, target: Target, tried: list[Target] | None, timing: Timing) -> None:
        self.target = target
        self.tried = tried
        self.timing = timing
        self.answer = b""
        self.events: AsyncGenerator[bytes, None] | None = None
        self.first: bytes | None = None
        self.spilled: list[Target] | None = None

    def headers(self, fields: dict[str, object]) -> dict[str, str]:
        fields["target"] = self.target.label
        extra = {"X-Sidecar-Target": self.target.label}
        spilled = self.spilled
        failed = [t for t in self.tried if spilled is None or t not in spilled] if self.tried \
            else None
        if failed:
            labels = ", ".join(t.label for t in failed)
            extra["X-Sidecar-Fallback-From"] = labels
            fields["fallback_from"] = labels
        if spilled:
            labels = ", ".join(t.label for t in spilled)
            extra["X-Sidecar-Spill-Over-From"] = labels
            fields["spill_over_from"] = labels
        return extra


async def _reach(request: web.Request, gateway: Gateway, exchange: Exchange) -> Reached:
    """Try targets until one answers (its first event, for a stream)."""
    context = request[CONTEXT]
    router = gateway.router
    router.budget.deposit()
    parsed = exchange.parsed
    route = exchange.route
    streaming = isinstance(parsed, Sampling) and parsed.stream
    tried: list[Target] | None = None
    spilled: list[Target] | None = None
    # Local targets skipped, and counted as spilled, because the prompt is long.
    skip = route.long_prompt(len(exchange.body) // 4) if route.prefer_local_below_tokens \
        else None
    if skip:
        context.fields["rule"] = "long_prompt"
    while True:
        target = router.pick(route, tried, skip)
        call = Call(exchange.endpoint, exchange.body_for(target), context.request_id,
                    context.timing, router.budget)
        if target.local:
            # A local engine that is loading keeps the request only if nothing else can.
            call.patient = not (route.spill_over and router.has_candidate(
                route, [*(tried if tried is not None else skip or ()), target]))
        backend = gateway.backends[target.provider]
        reached = Reached(target, tried, call.timing)
        reached.spilled = spilled
        try:
            if streaming:
                # Nothing is sent before the first event: until then an error is a plain
                # JSON answer, and another target may still serve the request.
                events = reached.events = backend.stream(call)
                try:
                    reached.first = await anext(events)
                except StopAsyncIteration:
                    reached.first = None
                except BaseException:
                    await events.aclose()
                    raise
            else:
                reached.answer = await backend.complete(call)
        except SidecarError as exc:
            after = [*(tried if tried is not None else skip or ()), target]
            if isinstance(exc, Spillable):
                # Full or not ready: the next target, free of the retry budget.
                if route.spill_over and router.has_candidate(route, after):
                    tried = after
                    spilled = [*(spilled or ()), target]
                    continue
                raise
            if not router.failed(target, exc):
                raise
            tried = after
            if not router.has_candidate(exchange.route, tried) or not router.budget.withdraw():
                raise
            continue
        router.succeeded(target)
        return reached


async def _respond(request: web.Request, reached: Reached, usage: list[int] | None,
                   cache_state: str | None = None) -> web.StreamResponse:
    """Write the answer of the target reached: JSON, or the stream as it comes."""
    fields = request[CONTEXT].fields
    extra = reached.headers(fields)
    if cache_state is not None:
        extra["X-Sidecar-Cache"] = cache_state
    if reached.events is not None:
        fields["stream"] = True
        if usage is not None:
            usage.append(-1)  # until a usage chunk says otherwise
        return await _write_stream(request, reached.events, reached.first, reached.timing,
                                   extra, usage)
    if usage is not None:
        usage.append(_total_tokens(reached.answer))
    response = json_bytes(request, reached.answer)
    response.headers.extend(extra)
    return response


async def _cached(request: web.Request, gateway: Gateway, exchange: Exchange,
                  usage: list[int] | None, cache: ResponseCache) -> web.StreamResponse:
    """Answer a deterministic request from the cache (a JSON answer or a recorded stream,
    either way round), or fetch it (once, however many identical JSON requests are in
    flight) and keep it."""
    settings = request.app[SETTINGS].cache
    payload, parsed = exchange.payload, exchange.parsed
    if settings.cache_when == "never" or (
            settings.cache_when == "deterministic" and not deterministic(payload)):
        cache.counts["bypass"] += 1
        return await _respond(request, await _reach(request, gateway, exchange), usage, "bypass")
    streaming = isinstance(parsed, Sampling) and parsed.stream
    context = request[CONTEXT]
    fields = context.fields
    tenant = context.principal.tenant
    control = request.headers.get("Cache-Control", "")
    key = cache_key(request.app[CACHE_SECRET], tenant, exchange.endpoint, payload)
    if "no-cache" not in control:
        record = await cache.get(key, tenant)
        if record is not None:
            replayed = await _replay(request, cache, record, streaming, payload, usage)
            if replayed is not None:
                return replayed
    store = "no-store" not in control
    if streaming:
        reached = await _reach(request, gateway, exchange)
        if store and reached.events is not None:
            reached.events = _recording(reached.events, reached.first, key, tenant, cache)
        fields["cache"] = "miss"
        cache.counts["miss"] += 1
        return await _respond(request, reached, usage, "miss")
    extra: dict[str, str] = {}

    async def fetch() -> bytes:
        reached = await _reach(request, gateway, exchange)
        extra.update(reached.headers(fields))
        return reached.answer

    answer, shared = await cache.single_flight(key, tenant, fetch, fleet=store)
    state = "hit" if shared else "miss"
    fields["cache"] = state
    cache.counts[state] += 1
    if not shared and store:
        cache.put(key, Record(tenant, "json", answer))
    if usage is not None:
        usage.append(0 if shared else _total_tokens(answer))
    response = json_bytes(request, answer)
    response.headers.extend(extra)
    response.headers["X-Sidecar-Cache"] = state
    return response


async def _replay(request: web.Request, cache: ResponseCache, record: Record,
                  streaming: bool, payload: dict[str, Any], usage: list[int] | None
                  ) -> web.StreamResponse | None:
    """A hit, as the client asked for it; None when the record cannot take that shape."""
    context = request[CONTEXT]
    if streaming:
        options = payload.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        chunks = as_chunks(record, include_usage)
        if chunks is None:
            return None
        context.fields["cache"] = "hit"
        cache.counts["hit"] += 1
        if usage is not None:
            usage.append(0)  # a hit spends no tokens
        return await _write_stream(request, _listed(chunks[1:]), chunks[0] if chunks else None,
                                   context.timing, {"X-Sidecar-Cache": "hit"}, None)
    body = as_json(record)
    if body is None:
        return None
    context.fields["cache"] = "hit"
    cache.counts["hit"] += 1
    if usage is not None:
        usage.append(0)
    response = json_bytes(request, body)
    response.headers["X-Sidecar-Cache"] = "hit"
    return response


async def _listed(chunks: list[bytes]) -> AsyncGenerator[bytes, None]:
    for chunk in chunks:
        yield chunk


async def _recording(events: AsyncGenerator[bytes, None], first: bytes | None, key: str,
                     tenant: str, cache: ResponseCache) -> AsyncGenerator[bytes, None]:
    """Pass the stream on and keep it once it ended well: a stream that broke, or whose
    client left, is never stored."""
    chunks = [first] if first else []
    try:
        async for data in events:
            if data:  # heartbeats are not part of the answer
                chunks.append(data)
            yield data
    finally:
        await events.aclose()
    if chunks:
        cache.put(key, Record(tenant, "stream", chunks=chunks))


async def _read_body(request: web.Request) -> bytes:
    if request.content.is_eof():  # usually the whole body came with the headers
        return await request.read()
    limit = request.app[SETTINGS].server.body_timeout_s
    try:
        async with asyncio.timeout(limit):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {limit:g}s.") from None


def _estimate_tokens(
    body: bytes,
    parsed: ChatCompletionRequest | CompletionRequest | EmbeddingRequest,
    default_max_tokens: int,
) -> int:
    prompt = len(body) // 4  # about four bytes of JSON per token
    if isinstance(parsed, EmbeddingRequest):
        return prompt
    limit = parsed.max_tokens
    if isinstance(parsed, ChatCompletionRequest) and parsed.max_completion_tokens is not None:
        limit = parsed.max_completion_tokens
    return prompt + (limit or default_max_tokens) * (parsed.n or 1)


def _total_tokens(body: bytes) -> int:
    """`usage.total_tokens` of a response or chunk, or -1 when it has none."""
    try:
        usage = orjson.loads(body).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return -1
    if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
        return int(usage["total_tokens"])
    return -1


routes.post("/v1/chat/completions")(partial(proxy, "chat/completions", ChatCompletionRequest))
routes.post("/v1/completions")(partial(proxy, "completions", CompletionRequest))
routes.post("/v1/embeddings")(partial(proxy, "embeddings", EmbeddingRequest))


async def _write_stream(
    request: web.Request,
    events: AsyncGenerator[bytes, None],
    first: bytes | None,
    timing: Timing,
    extra: dict[str, str],
    usage: list[int] | None,
) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    try:
        response = await _open_stream(request, timing, extra)
        try:
            if first is not None:
                await response.write(_frame(first))
                if usage is None:
                    await _pump(response, events)
                else:
                    await _pump_metered(response, events, usage)
            await response.write(DONE_FRAME)
        except SidecarError as exc:
            # Past the first byte the status is spent: say what happened in the stream and
            # end it without [DONE], so the client knows the answer is incomplete.
            request[CONTEXT].fields["stream_error"] = exc.code or exc.type
            await response.write(frame(exc.to_json()))
        await response.write_eof()
        return response
    except ConnectionResetError:
        # The client went away between two events: the upstream is closed below, and what is
        # returned goes nowhere; the log line carries stream_error = client_gone.
        request[CONTEXT].fields["stream_error"] = "client_gone"
        return response if response is not None else web.Response(status=499)
    finally:
        await events.aclose()


def _frame(data: bytes) -> bytes:
    """An event, or a heartbeat comment for the empty item a silent source yields."""
    return frame(data) if data else HEARTBEAT_FRAME


async def _pump(response: web.StreamResponse, events: AsyncIterator[bytes]) -> None:
    write = response.write
    async for data in events:
        await write(_frame(data))


async def _pump_metered(
    response: web.StreamResponse, events: AsyncIterator[bytes], usage: list[int]
) -> None:
    async for data in events:
        if b'"usage":{' in data:
            usage.append(_total_tokens(data))
        await response.write(_frame(data))


async def _open_stream(
    request: web.Request, timing: Timing, extra: dict[str, str]
) -> web.StreamResponse:
    response = web.StreamResponse(headers=_SSE_HEADERS)
    response.headers.update(extra)
    response.headers["X-Request-Id"] = request[CONTEXT].request_id
    response.headers["X-Sidecar-Overhead-Ms"] = f"{timing.overhead_ms():.3f}"
    await response.prepare(request)
    return response
