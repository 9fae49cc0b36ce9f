"""The Redis tier and the fleet's cache, driven directly (no sidecar process) against a real
redis-server: fast enough to judge mutants of redis_tier.py and response_cache.py."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from sidecar.cache.memory import MemoryCache
from sidecar.cache.records import Record
from sidecar.cache.redis_tier import RedisTier
from sidecar.cache.response_cache import ResponseCache
from tests.support.redis_server import RedisServer
from tests.support.sidecar import closed_port

SECRET = b"fleet-secret-0123456789abcdef0123"
ANSWER = b'{"object": "chat.completion", "choices": []}'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    instance = RedisServer(tmp_path_factory.mktemp("redis"))
    instance.start()
    yield instance
    instance.stop()


async def test_values_are_kept_under_the_prefix_for_their_ttl(server: RedisServer) -> None:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="t1:")
    try:
        await tier.set("k", b"value", 0.2)
        assert await tier.get("k") == b"value"
        assert "t1:k" in server.stored()
        assert await tier.get("missing") is None
        await asyncio.sleep(0.3)
        assert await tier.get("k") is None
        assert tier.describe() == {"healthy": True, "failures": 0, "skipped_while_open": 0,
                                   "last_error": None}
    finally:
        await tier.close()


async def test_a_lock_is_held_by_one_and_let_go_only_by_its_holder(server: RedisServer) -> None:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="t2:")
    try:
        assert await tier.lock("k", "mine", 5) is True
        assert await tier.lock("k", "theirs", 5) is False
        assert await tier.locked("k") is True
        await tier.unlock("k", "theirs")
        assert await tier.locked("k") is True
        await tier.unlock("k", "mine")
        assert await tier.locked("k") is False
        assert await tier.lock("short", "mine", 0.1) is True
        await asyncio.sleep(0.2)
        assert await tier.locked("short") is False
    finally:
        await tier.close()


async def test_a_redis_that_is_away_opens_the_circuit_for_its_period() -> None:
    tier = RedisTier(f"redis://127.0.0.1:{closed_port()}/0", timeout_s=0.5, circuit_s=0.3)
    try:
        assert await tier.get("k") is None
        assert tier.failures == 1 and not tier.healthy
        assert tier.last_error == "ConnectionError"
        assert await tier.lock("k", "t", 1) is None  # nobody knows: everyone goes on alone
        await tier.set("k", b"v", 1)
        assert tier.skipped == 2 and tier.failures == 1
        assert tier.describe() == {"healthy": False, "failures": 1, "skipped_while_open": 2,
                                   "last_error": "ConnectionError"}
        await asyncio.sleep(0.35)
        assert tier.healthy
        assert await tier.run_script(tier.script("return 1"), ["k"], []) is None
        assert tier.failures == 2
    finally:
        await tier.close()


def caches(server: RedisServer, prefix: str) -> tuple[RedisTier, ResponseCache, ResponseCache]:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix=prefix)
    one = ResponseCache(MemoryCache(16, 60), 60, tier, lock_s=2.0, secret=SECRET)
    two = ResponseCache(MemoryCache(16, 60), 60, tier, lock_s=2.0, secret=SECRET)
    return tier, one, two


async def test_an_answer_kept_by_one_sidecar_is_served_by_another(server: RedisServer) -> None:
    tier, one, two = caches(server, "t3:")
    try:
        one.put("k", Record("alice", "json", ANSWER))
        await asyncio.sleep(0.1)
        assert await two.get("k", "bob") is None
        found = await two.get("k", "alice")
        assert found is not None and found.body == ANSWER and found.kind == "json"
        assert len(two.memory) == 1  # kept in process for the next time
        stranger = ResponseCache(MemoryCache(16, 60), 60, tier, secret=b"x" * 32)
        assert await stranger.get("k", "alice") is None
        assert stranger.counts["forged"] == 1
        assert two.describe()["redis"]["healthy"] is True
        one.put("broken", Record("alice", "stream", chunks=[b"{}"]))
        await asyncio.sleep(0.1)
        assert "t3:broken" not in server.stored()
    finally:
        await tier.close()


async def test_identical_misses_on_two_sidecars_make_one_fetch(server: RedisServer) -> None:
    tier, one, two = caches(server, "t4:")
    calls = 0

    async def fetch() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2)
        return ANSWER

    try:
        first = asyncio.ensure_future(one.single_flight("k", "alice", fetch))
        await asyncio.sleep(0.05)
        second = await two.single_flight("k", "alice", fetch)
        assert await first == (ANSWER, False)
        assert second == (ANSWER, True)
        assert calls == 1
        assert await tier.locked("k") is False  # let go once stored
        kept = await two.get("k", "alice")
        assert kept is not None and kept.body == ANSWER
        # Another tenant waits for nobody: its own fetch.
        assert await two.single_flight("k2", "bob", fetch) == (ANSWER, False)
        assert calls == 2
    finally:
        await tier.close()


async def test_a_fetch_that_fails_on_one_sidecar_is_made_again_by_the_other(
        server: RedisServer) -> None:
    tier, one, two = caches(server, "t5:")
    calls = 0

    async def failing() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        raise ValueError("upstream down")

    async def fetch() -> bytes:
        nonlocal calls
        calls += 1
        return ANSWER

    try:
        first = asyncio.ensure_future(one.single_flight("k", "alice", failing))
        await asyncio.sleep(0.03)
        assert await two.single_flight("k", "alice", fetch) == (ANSWER, False)
        with pytest.raises(ValueError):
            await first
        assert calls == 2
        assert await tier.locked("k") is False
    finally:
        await tier.close()


async def test_without_the_fleet_flag_only_this_process_is_single_flighted(
        server: RedisServer) -> None:
    tier, one, _ = caches(server, "t6:")

    async def fetch() -> bytes:
        return ANSWER

    try:
        assert await one.single_flight("k", "alice", fetch, fleet=False) == (ANSWER, False)
        assert await tier.locked("k") is False
        assert "t6:k" not in server.stored()
    finally:
        await tier.close()


async def test_one_tenants_answers_leave_redis_and_the_others_stay(server: RedisServer) -> None:
    tier, one, two = caches(server, "t7:")
    keys = {name: hashlib.sha256(name.encode()).hexdigest() for name in ("a1", "a2", "b1")}
    try:
        one.put(keys["a1"], Record("alice", "json", ANSWER))
        one.put(keys["a2"], Record("alice", "json", ANSWER))
        one.put(keys["b1"], Record("bob", "json", ANSWER))
        for _ in range(100):
            if len([k for k in server.stored() if k.startswith("t7:")]) == 3:
                break
            await asyncio.sleep(0.02)
        # Another sidecar of the fleet drops alice's: Redis keeps only bob's.
        assert await two.drop_in_redis("alice") == 2
        assert [k for k in server.stored() if k.startswith("t7:")] == ["t7:" + keys["b1"]]
        assert await two.get(keys["b1"], "bob") is not None
        assert await two.drop_in_redis(None) == 1
        assert not [k for k in server.stored() if k.startswith("t7:")]
    finally:
        await tier.close()


def sealed(key: str, record: Record, secret: bytes = SECRET) -> bytes:
    """A record as the fleet stores it, written out from the rule rather than by the cache."""
    body = record.encode()
    mac = hmac.new(secret, b"record\0" + key.encode() + b"\0" + body, hashlib.sha256)
    return mac.hexdigest().encode() + b"." + body


async def test_a_record_is_sealed_by_the_documented_rule(server: RedisServer) -> None:
    tier, one, _ = caches(server, "t8:")
    record = Record("alice", "json", ANSWER)
    try:
        one.put("k", record)
        for _ in range(100):
            if await tier.get("k") is not None:
                break
            await asyncio.sleep(0.01)
        assert await tier.get("k") == sealed("k", record)
    finally:
        await tier.close()


async def test_a_record_moved_to_another_key_or_altered_is_refused_and_counted(
        server: RedisServer) -> None:
    tier, _, two = caches(server, "t9:")
    record = Record("alice", "json", ANSWER)
    try:
        await tier.set("moved", sealed("k", record), 60)
        altered = sealed("k", record).replace(b"chat.completion", b"chat.complexion")
        await tier.set("k", altered, 60)
        assert await two.get("moved", "alice") is None
        assert await two.get("k", "alice") is None
        assert two.counts["forged"] == 2
    finally:
        await tier.close()


async def test_caches_given_no_secret_each_make_their_own(server: RedisServer) -> None:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="t10:")
    one, two = (ResponseCache(MemoryCache(16, 60), 60, tier) for _ in range(2))
    try:
        await tier.set("k", one._seal("k", Record("alice", "json", ANSWER)), 60)
        assert await two.get("k", "alice") is None and two.counts["forged"] == 1
        assert await one.get("k", "alice") is not None
    finally:
        await tier.close()


async def test_an_answer_found_in_redis_is_kept_in_process_under_its_key_and_tenant(
        server: RedisServer) -> None:
    tier, _, two = caches(server, "t11:")
    record = Record("alice", "json", ANSWER)
    try:
        await tier.set("k", sealed("k", record), 60)
        assert await two.get("k", "alice") == record
        assert two.memory.get("k", "alice") == record
    finally:
        await tier.close()


async def test_the_fleets_fetcher_keeps_its_answer_in_process_and_keys_stay_apart(
        server: RedisServer) -> None:
    tier, one, _ = caches(server, "t12:")

    def answering(text: bytes) -> Callable[[], Awaitable[bytes]]:
        async def fetch() -> bytes:
            await asyncio.sleep(0.02)
            return text
        return fetch

    try:
        results = await asyncio.gather(one.single_flight("k1", "alice", answering(b'{"a": 1}')),
                                       one.single_flight("k2", "alice", answering(b'{"a": 2}')))
        assert list(results) == [(b'{"a": 1}', False), (b'{"a": 2}', False)]
        kept = one.memory.get("k1", "alice")
        assert kept is not None and kept.body == b'{"a": 1}'
    finally:
        await tier.close()


async def test_a_waiter_takes_the_answer_as_soon_as_it_is_stored_while_the_lock_is_held(
        server: RedisServer) -> None:
    tier, _, two = caches(server, "t13:")

    async def fetch() -> bytes:
        raise AssertionError("the answer was there: nothing to fetch")

    try:
        assert await tier.lock("k", "another sidecar", 5) is True
        await tier.set("k", sealed("k", Record("alice", "json", ANSWER)), 60)
        started = time.monotonic()
        assert await two.single_flight("k", "alice", fetch) == (ANSWER, True)
        assert time.monotonic() - started < 0.5  # it looks every 20 ms
    finally:
        await tier.close()


class LateTier(RedisTier):
    """A Redis where the lock's holder stores its answer and lets go in the instant between a
    waiter's look for the answer and its look at the lock."""

    stored: tuple[str, bytes] | None = None

    async def locked(self, key: str) -> bool:
        if self.stored is not None:
            await self.set(*self.stored, 60)
            self.stored = None
            await self.unlock(key, "another sidecar")
        return await super().locked(key)


async def test_an_answer_stored_just_before_the_lock_is_let_go_is_taken(
        server: RedisServer) -> None:
    tier = LateTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="t14:")
    cache = ResponseCache(MemoryCache(16, 60), 60, tier, lock_s=2.0, secret=SECRET)

    async def fetch() -> bytes:
        raise AssertionError("the answer was there: nothing to fetch")

    try:
        assert await tier.lock("k", "another sidecar", 5) is True
        tier.stored = ("k", sealed("k", Record("alice", "json", ANSWER)))
        assert await cache.single_flight("k", "alice", fetch) == (ANSWER, True)
    finally:
        await tier.close()


async def test_a_sidecar_that_fetched_without_the_lock_leaves_storing_to_its_caller(
        server: RedisServer) -> None:
    tier, _, two = caches(server, "t15:")

    async def fetch() -> bytes:
        return ANSWER

    try:
        # Another sidecar holds the lock briefly and stores nothing: this one fetches itself.
        assert await tier.lock("k", "another sidecar", 0.1) is True
        assert await two.single_flight("k", "alice", fetch) == (ANSWER, False)
        assert await tier.get("k") is None and two.memory.get("k", "alice") is None
    finally:
        await tier.close()
