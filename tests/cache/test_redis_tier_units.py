"""The Redis tier and the fleet's cache, driven directly (no sidecar process) against a real
redis-server: fast enough to judge mutants of redis_tier.py and response_cache.py."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator

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
