"""How the request path uses the response cache: a deterministic request is answered from a
kept answer (a JSON answer or a recorded stream, either way round) or fetched once, however
many identical JSON requests are in flight, and kept."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable

from sidecar.cache.records import Record, as_chunks, as_json
from sidecar.cache.response_cache import ResponseCache, cache_key, deterministic
from sidecar.exchange import OPENAI, Answer, Exchange
from sidecar.protocol.anthropic_messages import events_as_message, message_as_events
from sidecar.settings import CacheSettings


class AnswerCache:
    def __init__(self, cache: ResponseCache, settings: CacheSettings, secret: bytes) -> None:
        self.cache = cache
        self._when = settings.cache_when
        self._secret = secret

    async def answer(self, exchange: Exchange, fetch: Callable[[], Awaitable[Answer]]
                     ) -> Answer:
        cache = self.cache
        record = exchange.context.record
        if self._when == "never" or (
                self._when == "deterministic" and not deterministic(exchange.payload)):
            cache.counts["bypass"] += 1
            answer = await fetch()
            record.cache = "bypass"
            answer.headers["X-Sidecar-Cache"] = "bypass"
            return answer
        tenant = exchange.context.principal.tenant
        control = exchange.headers.get("Cache-Control", "")
        key = cache_key(self._secret, tenant, exchange.endpoint, exchange.payload)
        if "no-cache" not in control:
            kept = await cache.get(key, tenant)
            if kept is not None:
                replayed = _replay(kept, exchange)
                if replayed is not None:
                    record.cache = "hit"
                    cache.counts["hit"] += 1
                    return replayed
        store = "no-store" not in control
        if exchange.stream:
            answer = await fetch()
            if store and answer.events is not None:
                answer.events = _recording(answer.events, answer.first, key, tenant, cache)
            record.cache = "miss"
            cache.counts["miss"] += 1
            answer.headers["X-Sidecar-Cache"] = "miss"
            return answer
        fetched: list[Answer] = []

        async def body() -> bytes:
            answer = await fetch()
            fetched.append(answer)
            return answer.body

        text, shared = await cache.single_flight(key, tenant, body, fleet=store)
        state = "hit" if shared else "miss"
        record.cache = state
        cache.counts[state] += 1
        if shared:
            answer = Answer(text, None, None, exchange.protocol)
            answer.from_cache = True
        else:
            answer = fetched[0]
            if store:
                cache.put(key, Record(tenant, "json", text))
        answer.headers["X-Sidecar-Cache"] = state
        return answer


def _replay(kept: Record, exchange: Exchange) -> Answer | None:
    """A hit, in the shape the client asked for; None when the record cannot take it.
    Records are kept in the front door's protocol (the endpoint is part of the key)."""
    if exchange.protocol != OPENAI:  # Anthropic's
        if exchange.stream:
            events = kept.chunks if kept.kind == "stream" else message_as_events(kept.body)
            if not events:
                return None
            answer = Answer(b"", _listed(events[1:]), events[0], exchange.protocol)
        else:
            body = kept.body if kept.kind == "json" else events_as_message(kept.chunks)
            if body is None:
                return None
            answer = Answer(body, None, None, exchange.protocol)
    elif exchange.stream:
        chunks = as_chunks(kept, exchange.include_usage)
        if chunks is None:
            return None
        answer = Answer(b"", _listed(chunks[1:]), chunks[0] if chunks else None)
    else:
        body = as_json(kept)
        if body is None:
            return None
        answer = Answer(body)
    answer.from_cache = True
    answer.headers["X-Sidecar-Cache"] = "hit"
    return answer


async def _listed(chunks: list[bytes]) -> AsyncGenerator[bytes, None]:
    for chunk in chunks:
        yield chunk


async def _recording(events: AsyncGenerator[bytes, None], first: bytes | None, key: str,
                     tenant: str, cache: ResponseCache) -> AsyncGenerator[bytes, None]:
    """Pass the stream on and keep it once it ended: a stream that broke, or whose client
    left, is never stored (and the cache refuses one that did not end well)."""
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
