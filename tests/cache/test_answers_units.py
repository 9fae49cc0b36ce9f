"""The request path's use of the cache without a sidecar: which requests bypass it, what a hit
replays in the shape and protocol asked for, what a miss keeps (a JSON answer, a stream once it
ended well), the Cache-Control a client sends, and identical requests in flight fetched once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import orjson
import pytest

from sidecar.cache.answers import AnswerCache
from sidecar.cache.memory import MemoryCache
from sidecar.cache.records import Record
from sidecar.cache.redis_tier import RedisTier
from sidecar.cache.response_cache import ResponseCache, cache_key
from sidecar.exchange import ANTHROPIC, OPENAI, Answer, Exchange
from sidecar.observability.timing import RequestContext
from sidecar.security.jwt import Principal
from sidecar.settings import CacheSettings
from tests.support.redis_server import RedisServer

SECRET = b"k" * 32
PAYLOAD: dict[str, Any] = {"model": "m", "messages": [], "temperature": 0}
CHAT = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 5,
                     "model": "m", "choices": [{"index": 0, "message": {
                         "role": "assistant", "content": "Hi"}, "logprobs": None,
                         "finish_reason": "stop"}]})
MESSAGE = orjson.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                        "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
                        "stop_sequence": None, "usage": {"input_tokens": 3,
                                                         "output_tokens": 1}})


def chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    return orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5,
                         "model": "m", "choices": [{"index": 0, "delta": delta,
                                                    "logprobs": None, "finish_reason": finish}]})


STREAM = [chunk("Hel"), chunk("lo"), chunk(finish="stop")]


def exchange(payload: dict[str, Any] | None = None, *, tenant: str = "alice",
             stream: bool = False, headers: dict[str, str] | None = None,
             protocol: str = OPENAI, endpoint: str = "chat/completions") -> Exchange:
    body = payload if payload is not None else dict(PAYLOAD)
    made = Exchange(endpoint, orjson.dumps(body), body, "m",
                    RequestContext("req-1", Principal(tenant, frozenset(), None)),
                    headers or {}, protocol)
    made.stream = stream
    return made


def answers(when: str = "deterministic") -> AnswerCache:
    settings = CacheSettings(enabled=True, cache_when=when)  # type: ignore[arg-type]
    return AnswerCache(ResponseCache(MemoryCache(16, 60), 60, secret=SECRET), settings, SECRET)


class Upstream:
    """Counts its calls; answers with a JSON body or a stream of the chunks it is given."""

    def __init__(self, body: bytes = CHAT, chunks: list[bytes] | None = None,
                 protocol: str = OPENAI) -> None:
        self.body = body
        self.chunks = chunks
        self.protocol = protocol
        self.calls = 0
        self.delay = 0.0

    async def __call__(self) -> Answer:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.chunks is None:
            return Answer(self.body, None, None, self.protocol)
        return Answer(b"", listed(self.chunks[1:]), self.chunks[0], self.protocol)


async def listed(chunks: list[bytes]) -> AsyncGenerator[bytes, None]:
    for item in chunks:
        yield item


async def drained(answer: Answer) -> list[bytes]:
    assert answer.events is not None
    out = [answer.first] if answer.first is not None else []
    async for item in answer.events:
        out.append(item)
    await answer.close()
    return out


def key(tenant: str = "alice", endpoint: str = "chat/completions",
        payload: dict[str, Any] | None = None) -> str:
    return cache_key(SECRET, tenant, endpoint, payload if payload is not None else PAYLOAD)


# -- bypass -------------------------------------------------------------------------------

@pytest.mark.parametrize(("when", "payload"), [
    ("never", PAYLOAD), ("deterministic", {"model": "m", "messages": [], "temperature": 1})])
async def test_a_request_the_cache_is_not_for_bypasses_it(when: str,
                                                          payload: dict[str, Any]) -> None:
    cache, upstream = answers(when), Upstream()
    for _ in range(2):
        request = exchange(payload)
        answer = await cache.answer(request, upstream)
        assert answer.body == CHAT and answer.headers == {"X-Sidecar-Cache": "bypass"}
        assert request.context.record.cache == "bypass"
    assert upstream.calls == 2
    assert cache.cache.counts == {"hit": 0, "miss": 0, "bypass": 2, "forged": 0}
    assert len(cache.cache.memory) == 0


async def test_always_caches_a_request_that_is_not_deterministic() -> None:
    cache, upstream = answers("always"), Upstream()
    payload = {"model": "m", "messages": [], "temperature": 1}
    await cache.answer(exchange(payload), upstream)
    hit = await cache.answer(exchange(payload), upstream)
    assert upstream.calls == 1 and hit.headers["X-Sidecar-Cache"] == "hit"


# -- JSON: a miss kept, then hits ------------------------------------------------------------

async def test_a_miss_is_fetched_and_kept_and_the_next_one_is_a_hit() -> None:
    cache, upstream = answers(), Upstream()
    first = exchange()
    answer = await cache.answer(first, upstream)
    assert answer.body == CHAT and not answer.from_cache
    assert answer.headers == {"X-Sidecar-Cache": "miss"}
    assert first.context.record.cache == "miss"
    kept = cache.cache.memory.get(key(), "alice")
    assert kept == Record("alice", "json", CHAT)
    second = exchange()
    hit = await cache.answer(second, upstream)
    assert hit.body == CHAT and hit.from_cache and hit.events is None
    assert hit.headers == {"X-Sidecar-Cache": "hit"}
    assert second.context.record.cache == "hit"
    assert upstream.calls == 1
    assert cache.cache.counts == {"hit": 1, "miss": 1, "bypass": 0, "forged": 0}
    await cache.answer(exchange(), upstream)
    assert cache.cache.counts["hit"] == 2


async def test_answers_are_kept_per_tenant() -> None:
    cache, upstream = answers(), Upstream()
    await cache.answer(exchange(tenant="alice"), upstream)
    other = await cache.answer(exchange(tenant="bob"), upstream)
    assert other.headers["X-Sidecar-Cache"] == "miss" and upstream.calls == 2
    assert cache.cache.memory.get(key("bob"), "bob") is not None


async def test_no_cache_fetches_again_and_keeps_the_new_answer() -> None:
    cache, upstream = answers(), Upstream()
    await cache.answer(exchange(), upstream)
    upstream.body = CHAT.replace(b"Hi", b"Ho")
    fresh = await cache.answer(exchange(headers={"Cache-Control": "no-cache"}), upstream)
    assert fresh.body == upstream.body and fresh.headers["X-Sidecar-Cache"] == "miss"
    assert upstream.calls == 2
    kept = cache.cache.memory.get(key(), "alice")
    assert kept is not None and kept.body == upstream.body


async def test_no_store_is_answered_from_the_cache_but_never_kept() -> None:
    cache, upstream = answers(), Upstream()
    answer = await cache.answer(exchange(headers={"Cache-Control": "no-store"}), upstream)
    assert answer.headers["X-Sidecar-Cache"] == "miss"
    assert len(cache.cache.memory) == 0
    await cache.answer(exchange(), upstream)
    hit = await cache.answer(exchange(headers={"Cache-Control": "no-store"}), upstream)
    assert hit.headers["X-Sidecar-Cache"] == "hit" and upstream.calls == 2


async def test_identical_requests_in_flight_are_fetched_once() -> None:
    cache, upstream = answers(), Upstream()
    upstream.delay = 0.02
    requests = [exchange() for _ in range(3)]
    results = await asyncio.gather(*(cache.answer(r, upstream) for r in requests))
    assert upstream.calls == 1
    assert sorted(a.headers["X-Sidecar-Cache"] for a in results) == ["hit", "hit", "miss"]
    assert sorted(r.context.record.cache or "" for r in requests) == ["hit", "hit", "miss"]
    shared = [a for a in results if a.headers["X-Sidecar-Cache"] == "hit"]
    assert all(a.body == CHAT and a.from_cache and a.protocol == OPENAI for a in shared)
    assert cache.cache.counts["hit"] == 2 and cache.cache.counts["miss"] == 1


async def test_different_requests_in_flight_get_their_own_answers() -> None:
    cache = answers()
    first, second = Upstream(), Upstream(CHAT.replace(b"Hi", b"Ho"))
    first.delay = second.delay = 0.02
    other = dict(PAYLOAD, seed=1)
    results = await asyncio.gather(cache.answer(exchange(), first),
                                   cache.answer(exchange(other), second))
    assert [a.body for a in results] == [first.body, second.body]
    assert first.calls == second.calls == 1


async def test_no_store_requests_in_flight_are_still_fetched_once_in_this_process() -> None:
    cache, upstream = answers(), Upstream()
    upstream.delay = 0.02
    results = await asyncio.gather(*(cache.answer(
        exchange(headers={"Cache-Control": "no-store"}), upstream) for _ in range(2)))
    assert upstream.calls == 1 and len(cache.cache.memory) == 0
    assert sorted(a.headers["X-Sidecar-Cache"] for a in results) == ["hit", "miss"]


async def test_a_shared_answer_is_in_the_front_doors_protocol() -> None:
    cache, upstream = answers(), Upstream(MESSAGE, protocol=ANTHROPIC)
    upstream.delay = 0.02
    payload = {"model": "m", "messages": [], "temperature": 0, "max_tokens": 5}
    results = await asyncio.gather(*(cache.answer(
        exchange(payload, protocol=ANTHROPIC, endpoint="messages"), upstream)
        for _ in range(2)))
    assert [a.protocol for a in results] == [ANTHROPIC, ANTHROPIC]


# -- streams --------------------------------------------------------------------------------

async def test_a_stream_is_kept_once_it_ended_well_without_its_heartbeats() -> None:
    cache, upstream = answers(), Upstream(chunks=[STREAM[0], b"", *STREAM[1:]])
    request = exchange(stream=True)
    answer = await cache.answer(request, upstream)
    assert answer.headers == {"X-Sidecar-Cache": "miss"} and request.context.record.cache == "miss"
    assert cache.cache.counts["miss"] == 1
    assert len(cache.cache.memory) == 0  # not before it ended
    assert await drained(answer) == [STREAM[0], b"", *STREAM[1:]]
    assert cache.cache.memory.get(key(), "alice") == Record("alice", "stream", chunks=STREAM)


async def test_a_stream_that_opens_with_a_heartbeat_is_kept_without_it() -> None:
    cache, upstream = answers(), Upstream(chunks=[b"", *STREAM])
    assert await drained(await cache.answer(exchange(stream=True), upstream)) == [b"", *STREAM]
    assert cache.cache.memory.get(key(), "alice") == Record("alice", "stream", chunks=STREAM)
    assert cache.cache.counts["miss"] == 1
    await drained(await cache.answer(exchange(stream=True, headers={
        "Cache-Control": "no-cache"}), upstream))
    assert cache.cache.counts["miss"] == 2


async def test_a_stream_whose_client_left_is_not_kept() -> None:
    cache, upstream = answers(), Upstream(chunks=STREAM)
    answer = await cache.answer(exchange(stream=True), upstream)
    assert answer.events is not None
    await anext(answer.events)
    await answer.close()
    assert len(cache.cache.memory) == 0


async def test_a_stream_with_no_store_is_passed_on_and_not_kept() -> None:
    cache, upstream = answers(), Upstream(chunks=STREAM)
    answer = await cache.answer(exchange(stream=True, headers={"Cache-Control": "no-store"}),
                                upstream)
    assert await drained(answer) == STREAM
    assert len(cache.cache.memory) == 0


async def test_a_stream_with_no_events_keeps_nothing() -> None:
    cache = answers()

    async def empty() -> Answer:
        return Answer(b"", listed([]), None)

    assert await drained(await cache.answer(exchange(stream=True), empty)) == []
    assert len(cache.cache.memory) == 0


async def test_a_kept_stream_answers_a_json_request_and_the_other_way_round() -> None:
    cache = answers()
    cache.cache.put(key(), Record("alice", "stream", chunks=STREAM))
    whole = await cache.answer(exchange(), Upstream())
    assert orjson.loads(whole.body)["choices"][0]["message"]["content"] == "Hello"
    assert whole.headers == {"X-Sidecar-Cache": "hit"} and whole.from_cache
    other = dict(PAYLOAD, n=1)
    cache.cache.put(key(payload=other), Record("alice", "json", CHAT))
    replay = await cache.answer(exchange(other, stream=True), Upstream())
    assert replay.headers == {"X-Sidecar-Cache": "hit"} and replay.from_cache
    events = [orjson.loads(e) for e in await drained(replay)]
    assert [e["choices"][0]["delta"] for e in events] == [
        {"role": "assistant", "content": ""}, {"content": "Hi"}, {}]


async def test_a_kept_answer_without_the_usage_asked_for_is_a_miss() -> None:
    cache, upstream = answers(), Upstream(chunks=STREAM)
    cache.cache.put(key(), Record("alice", "stream", chunks=STREAM))
    request = exchange(stream=True)
    request.include_usage = True
    answer = await cache.answer(request, upstream)
    assert answer.headers["X-Sidecar-Cache"] == "miss" and upstream.calls == 1
    await drained(answer)


async def test_a_kept_answer_that_cannot_take_the_shape_asked_for_is_a_miss() -> None:
    cache, upstream = answers(), Upstream()
    two = orjson.dumps({"object": "chat.completion", "choices": [
        {"index": 0, "message": {"content": "a"}, "finish_reason": "stop"},
        {"index": 1, "message": {"content": "b"}, "finish_reason": "stop"}]})
    cache.cache.put(key(), Record("alice", "json", two))
    answer = await cache.answer(exchange(stream=True), Upstream(chunks=STREAM))
    assert answer.headers["X-Sidecar-Cache"] == "miss"
    await drained(answer)
    stream_of_two = [orjson.dumps({"object": "chat.completion.chunk", "choices": [
        {"index": i, "delta": {"content": "x"}, "finish_reason": "stop"}]}) for i in (0, 1)]
    other = dict(PAYLOAD, n=2)
    cache.cache.put(key(payload=other), Record("alice", "stream", chunks=stream_of_two))
    assert (await cache.answer(exchange(other), upstream)).headers["X-Sidecar-Cache"] == "miss"


# -- Anthropic's front door -----------------------------------------------------------------

def anthropic(stream: bool = False) -> Exchange:
    payload = {"model": "m", "messages": [], "temperature": 0, "max_tokens": 5}
    return exchange(payload, stream=stream, protocol=ANTHROPIC, endpoint="messages")


def anthropic_key() -> str:
    return key(endpoint="messages",
               payload={"model": "m", "messages": [], "temperature": 0, "max_tokens": 5})


async def test_a_kept_message_replays_as_a_message_or_as_its_events() -> None:
    cache = answers()
    cache.cache.put(anthropic_key(), Record("alice", "json", MESSAGE))
    whole = await cache.answer(anthropic(), Upstream())
    assert whole.body == MESSAGE and whole.protocol == ANTHROPIC and whole.from_cache
    assert whole.headers == {"X-Sidecar-Cache": "hit"}
    streamed = await cache.answer(anthropic(stream=True), Upstream())
    assert streamed.protocol == ANTHROPIC and streamed.from_cache
    events = [orjson.loads(e) for e in await drained(streamed)]
    assert events[0]["type"] == "message_start"
    assert events[-1]["delta"]["stop_reason"] == "end_turn"
    assert events[0]["message"]["id"] == "msg_1"


async def test_kept_message_events_replay_as_events_or_as_the_message_they_spell() -> None:
    cache = answers()
    events = await drained(await cache.answer(anthropic(stream=True), Upstream(
        chunks=await _message_events())))
    assert events  # kept now, as a stream
    replay = await cache.answer(anthropic(stream=True), Upstream())
    assert await drained(replay) == events
    whole = orjson.loads((await cache.answer(anthropic(), Upstream())).body)
    assert whole["id"] == "msg_1" and whole["content"] == [{"type": "text", "text": "Hi"}]


async def test_a_kept_record_that_is_no_message_is_a_miss_at_the_anthropic_door() -> None:
    cache = answers()
    cache.cache.put(anthropic_key(), Record("alice", "json", CHAT))  # servable, not a message
    answer = await cache.answer(anthropic(stream=True), Upstream(chunks=await _message_events()))
    assert answer.headers["X-Sidecar-Cache"] == "miss"
    await drained(answer)
    failing = [orjson.dumps({"type": "message_start", "message": {"id": "m2"}}),
               orjson.dumps({"type": "error", "error": {"type": "overloaded_error"}}),
               orjson.dumps({"type": "message_delta", "delta": {"stop_reason": "end_turn"}})]
    cache.cache.memory.put(anthropic_key(), "alice", Record("alice", "stream", chunks=failing))
    miss = await cache.answer(anthropic(), Upstream(MESSAGE, protocol=ANTHROPIC))
    assert miss.headers["X-Sidecar-Cache"] == "miss"


async def _message_events() -> list[bytes]:
    from sidecar.protocol.anthropic_messages import message_as_events
    events = message_as_events(MESSAGE)
    assert events is not None
    return events


# -- a fleet on one Redis -------------------------------------------------------------------

def fleet_member(tier: RedisTier) -> AnswerCache:
    return AnswerCache(ResponseCache(MemoryCache(16, 60), 60, tier, secret=SECRET),
                       CacheSettings(enabled=True), SECRET)


async def test_an_answer_one_sidecar_fetched_is_a_hit_on_another(server: RedisServer) -> None:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="a1:")
    try:
        one, two = fleet_member(tier), fleet_member(tier)
        await one.answer(exchange(), Upstream())
        hit = await two.answer(exchange(), Upstream())
        assert hit.headers["X-Sidecar-Cache"] == "hit" and hit.body == CHAT
    finally:
        await tier.close()


async def test_no_store_keeps_nothing_in_redis_either(server: RedisServer) -> None:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="a2:")
    try:
        await fleet_member(tier).answer(exchange(headers={"Cache-Control": "no-store"}),
                                        Upstream())
        await asyncio.sleep(0.05)
        assert not [k for k in server.stored() if k.startswith("a2:")]
    finally:
        await tier.close()
