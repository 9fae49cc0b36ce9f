"""The cache's tiers without Redis: keys, expiry, the LRU, the tenant check, sealed records,
and single flight."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time

import pytest

from sidecar.cache.memory import MemoryCache
from sidecar.cache.records import Record
from sidecar.cache.response_cache import ResponseCache, cache_key, deterministic

ANSWER = Record("alice", "json", b'{"choices": []}')
SECRET = b"s" * 32


def test_the_key_binds_secret_tenant_endpoint_and_every_field_that_changes_the_answer() -> None:
    payload = {"model": "m", "messages": [], "temperature": 0}
    key = cache_key(SECRET, "alice", "chat/completions", payload)
    assert len(key) == 64 and key == cache_key(SECRET, "alice", "chat/completions",
                                               dict(reversed(list(payload.items()))))
    others = {cache_key(b"t" * 32, "alice", "chat/completions", payload),
              cache_key(SECRET, "bob", "chat/completions", payload),
              cache_key(SECRET, "alice", "completions", payload),
              cache_key(SECRET, "alice", "chat/completions", {**payload, "temperature": 0.5}),
              cache_key(SECRET, "alice", "chat/completions", {**payload, "n": 2})}
    assert key not in others and len(others) == 5
    # The tenant and the endpoint are kept apart: neither can be shifted into the other.
    assert cache_key(SECRET, "a", "bc", payload) != cache_key(SECRET, "ab", "c", payload)


def test_the_key_is_the_documented_hmac_so_every_version_in_a_fleet_agrees() -> None:
    payload = {"temperature": 0, "model": "m", "stream": True}
    message = b'alice\0chat/completions\0{"model":"m","temperature":0}'
    assert cache_key(SECRET, "alice", "chat/completions", payload) == hmac.new(
        SECRET, message, hashlib.sha256).hexdigest()


def test_the_cache_waits_ten_seconds_for_the_fleet_by_default() -> None:
    assert ResponseCache(MemoryCache(4, 60), 60).lock_s == 10.0


async def test_different_keys_in_flight_at_once_get_their_own_answers() -> None:
    cache = ResponseCache(MemoryCache(4, 60), 60)

    async def one() -> bytes:
        await asyncio.sleep(0.02)
        return b"1"

    async def two() -> bytes:
        await asyncio.sleep(0.02)
        return b"2"

    results = await asyncio.gather(cache.single_flight("k1", "t", one),
                                   cache.single_flight("k2", "t", two))
    assert list(results) == [(b"1", False), (b"2", False)]


@pytest.mark.parametrize("field", ["stream", "stream_options", "user", "metadata", "store"])
def test_fields_that_cannot_change_the_answer_are_left_out_of_the_key(field: str) -> None:
    payload = {"model": "m", "temperature": 0}
    assert cache_key(SECRET, "a", "e", payload) == cache_key(
        SECRET, "a", "e", {**payload, field: {"x": 1}})


def test_deterministic_means_temperature_0_or_a_seed() -> None:
    assert deterministic({"temperature": 0})
    assert deterministic({"temperature": 0.0})
    assert deterministic({"seed": 0, "temperature": 1})
    assert not deterministic({})
    assert not deterministic({"temperature": 0.1})
    assert not deterministic({"seed": None})


def test_memory_entries_belong_to_their_tenant() -> None:
    memory = MemoryCache(4, 60)
    memory.put("k", "alice", ANSWER)
    assert memory.get("k", "bob") is None
    assert memory.get("k", "alice") is None  # dropped once another tenant reached it
    memory.put("k", "alice", ANSWER)
    assert memory.get("k", "alice") is ANSWER
    assert memory.get("other", "alice") is None


def test_memory_entries_expire() -> None:
    memory = MemoryCache(4, 0.05)
    memory.put("k", "alice", ANSWER)
    assert memory.get("k", "alice") is ANSWER
    time.sleep(0.06)
    assert memory.get("k", "alice") is None
    assert len(memory) == 0


def test_memory_keeps_the_most_recently_used() -> None:
    memory = MemoryCache(2, 60)
    memory.put("a", "t", ANSWER)
    memory.put("b", "t", ANSWER)
    assert memory.get("a", "t") is ANSWER  # now the most recent
    memory.put("c", "t", ANSWER)
    assert len(memory) == 2
    assert memory.get("b", "t") is None
    assert memory.get("a", "t") is ANSWER and memory.get("c", "t") is ANSWER
    memory.put("a", "t", ANSWER)  # a second put refreshes it too
    memory.put("d", "t", ANSWER)
    assert memory.get("c", "t") is None and memory.get("a", "t") is ANSWER


def test_memory_drops_everything_or_one_tenants_answers_and_says_how_many() -> None:
    memory = MemoryCache(8, 60)
    bob = Record("bob", "json", b"{}")
    for key in ("a1", "a2"):
        memory.put(key, "alice", ANSWER)
    memory.put("b1", "bob", bob)
    assert memory.drop("alice") == 2
    assert len(memory) == 1 and memory.get("b1", "bob") is bob
    assert memory.drop("nobody") == 0 and len(memory) == 1
    memory.put("a3", "alice", ANSWER)
    assert memory.drop() == 2
    assert len(memory) == 0 and memory.get("b1", "bob") is None


async def test_single_flight_makes_one_fetch_for_many_callers() -> None:
    memory = MemoryCache(4, 60)
    calls = 0

    async def fetch() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return b"answer"

    results = await asyncio.gather(*(memory.single_flight("k", fetch) for _ in range(5)))
    assert calls == 1
    assert sorted(results) == [(b"answer", False)] + [(b"answer", True)] * 4
    assert await memory.single_flight("k", fetch) == (b"answer", False)  # nothing in flight
    assert calls == 2


async def test_single_flight_shares_an_error_with_the_waiters() -> None:
    memory = MemoryCache(4, 60)
    calls = 0

    async def fetch() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        raise ValueError("upstream said no")

    results = await asyncio.gather(*(memory.single_flight("k", fetch) for _ in range(3)),
                                   return_exceptions=True)
    assert calls == 1
    assert all(isinstance(r, ValueError) for r in results)


async def test_single_flight_hands_over_when_the_fetching_caller_leaves() -> None:
    memory = MemoryCache(4, 60)
    calls = 0

    async def fetch() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return b"answer"

    first = asyncio.ensure_future(memory.single_flight("k", fetch))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(memory.single_flight("k", fetch))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await second == (b"answer", False)
    assert calls == 2


async def test_the_cache_without_redis_keeps_what_it_is_given() -> None:
    cache = ResponseCache(MemoryCache(4, 60), 60, secret=SECRET)
    cache.put("k", ANSWER)
    assert await cache.get("k", "alice") is ANSWER
    broken = Record("alice", "stream", chunks=[b'{"choices": [{"index": 0}]}'])
    cache.put("b", broken)
    assert await cache.get("b", "alice") is None
    assert cache.describe() == {"hit": 0, "miss": 0, "bypass": 0, "forged": 0,
                                "memory_entries": 1}
    assert await cache.get("k", "bob") is None


async def test_the_cache_without_redis_single_flights_in_process() -> None:
    cache = ResponseCache(MemoryCache(4, 60), 60)

    async def fetch() -> bytes:
        await asyncio.sleep(0.02)
        return b"{}"

    results = await asyncio.gather(*(cache.single_flight("k", "t", fetch) for _ in range(3)))
    assert sorted(results) == [(b"{}", False), (b"{}", True), (b"{}", True)]
