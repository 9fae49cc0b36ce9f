"""The Redis tier and the fleet's cache, driven directly (no sidecar process) against a real
redis-server: fast enough to judge mutants of redis_tier.py and response_cache.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from sidecar.cache.memory import MemoryCache
from sidecar.cache.records import Record
from sidecar.cache.redis_tier import RedisTier
from sidecar.cache.response_cache import ResponseCache
from tests.support.redis_server import RedisServer
from tests.support.sidecar import closed_port

SECRET = b"fleet-secret-0123456789abcdef0123"
ANSWER = b'{"object": "chat.completion", "choices": []}'


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


def redis_cli(server: RedisServer, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(server.port), *args], capture_output=True,
                          text=True, check=True).stdout


def info(server: RedisServer, section: str) -> dict[str, str]:
    lines = redis_cli(server, "INFO", section).splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def calls(server: RedisServer, command: str) -> int:
    stat = info(server, "commandstats").get(f"cmdstat_{command}", "calls=0")
    return int(stat.split(",")[0].removeprefix("calls="))


def connected(server: RedisServer) -> int:
    return int(info(server, "clients")["connected_clients"])


async def test_the_default_prefix_is_sc(server: RedisServer) -> None:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0)
    try:
        assert await tier.set("default-prefix", b"v", 60) is True
        assert "sc:default-prefix" in server.stored()
        assert await tier.delete("default-prefix") is True
        assert "sc:default-prefix" not in server.stored()
    finally:
        await tier.close()


async def test_a_set_and_a_lock_last_exactly_their_ttl(server: RedisServer) -> None:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="t16:")
    try:
        await tier.set("k", b"v", 10)
        assert await tier.lock("k", "mine", 10) is True
        for key in ("t16:k", "t16:lock:k"):
            assert 9000 < int(redis_cli(server, "PTTL", key)) <= 10000
    finally:
        await tier.close()


async def test_a_write_or_a_delete_with_redis_away_says_so() -> None:
    tier = RedisTier(f"redis://127.0.0.1:{closed_port()}/0", timeout_s=0.5, circuit_s=5.0)
    try:
        assert await tier.set("k", b"v", 60) is False
        assert await tier.delete("k") is False
    finally:
        await tier.close()


async def test_warming_opens_the_pools_sixteen_connections_without_naming_the_client(
        server: RedisServer) -> None:
    redis_cli(server, "CONFIG", "RESETSTAT")
    before = connected(server)
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="t17:")
    try:
        await tier.warm()
        assert connected(server) - before == 16
        # No CLIENT SETINFO, two round trips each: a Redis before 7.2 answers them with
        # errors, which would add two a connection to the one redis-py's own probe for
        # maintenance notifications costs there (a Redis before 8).
        errors = info(server, "errorstats").get("errorstat_ERR", "count=0")
        assert int(errors.removeprefix("count=")) <= 16
    finally:
        await tier.close()
    for _ in range(100):  # closing lets every connection go
        if connected(server) == before:
            break
        await asyncio.sleep(0.01)
    assert connected(server) == before


async def test_no_more_than_sixteen_commands_are_on_the_wire_at_once(
        server: RedisServer) -> None:
    before = connected(server)
    tier = RedisTier(server.url, timeout_s=2.0, circuit_s=1.0, prefix="t18:")
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, connected(server) - before)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:  # each command holds its connection for 0.1 s
        await asyncio.gather(*(tier._call("BLPOP", f"t18:empty{i}", "0.1") for i in range(40)))
        assert 0 < peak <= 16
    finally:
        watcher.cancel()
        await tier.close()


async def test_warming_a_redis_that_is_away_costs_a_log_line(
        caplog: pytest.LogCaptureFixture) -> None:
    tier = RedisTier(f"redis://127.0.0.1:{closed_port()}/0", timeout_s=0.5, circuit_s=1.0)
    try:
        with caplog.at_level(logging.WARNING, logger="sidecar.cache"):
            await tier.warm()
        (record,) = caplog.records
        assert record.getMessage() == "redis did not answer at start"
        assert record.__dict__["fields"] == {"error": "ConnectionError"}
    finally:
        await tier.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener never accepts: a connection completes and nothing answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield int(listener.getsockname()[1])


async def test_warming_waits_two_seconds_at_most(silent_port: int) -> None:
    tier = RedisTier(f"redis://127.0.0.1:{silent_port}/0", timeout_s=10.0, circuit_s=1.0)
    try:
        started = time.monotonic()
        async with asyncio.timeout(6):
            await tier.warm()
        assert 1.9 <= time.monotonic() - started < 2.8
    finally:
        await tier.close()


@contextlib.asynccontextmanager
async def trickling() -> AsyncIterator[int]:
    """A server that answers any command with a bulk string of ten bytes, one every 0.2 s."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read(1024)
            writer.write(b"$10\r\n")
            for _ in range(10):
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(b"x")
            writer.write(b"\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


async def test_an_answer_that_trickles_in_is_cut_off_at_the_deadline_as_a_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    async with trickling() as port:
        tier = RedisTier(f"redis://127.0.0.1:{port}/0", timeout_s=0.5, circuit_s=5.0)
        try:
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="sidecar.cache"):
                assert await tier.get("k") is None
            assert time.monotonic() - started < 1.2  # each byte came in time; the whole did not
            assert tier.last_error == "TimeoutError"
            (record,) = caplog.records
            assert record.__dict__["fields"]["reason"] == "timeout"
        finally:
            await tier.close()


async def test_the_circuit_opens_with_one_log_line_however_many_commands_fail(
        caplog: pytest.LogCaptureFixture) -> None:
    tier = RedisTier(f"redis://127.0.0.1:{closed_port()}/0", timeout_s=0.5, circuit_s=0.3)
    try:
        with caplog.at_level(logging.WARNING, logger="sidecar.cache"):
            await asyncio.gather(tier.get("a"), tier.get("b"))
        assert tier.failures == 2
        (record,) = caplog.records
        assert record.getMessage() == "redis unavailable: serving uncached"
        assert record.__dict__["fields"] == {"reason": "ConnectionError", "retry_in_s": 0.3,
                                             "failures": 1}
    finally:
        await tier.close()


async def test_a_restarted_redis_is_reached_again_at_once(tmp_path: Path) -> None:
    restarted = RedisServer(tmp_path)
    restarted.start()
    tier = RedisTier(restarted.url, timeout_s=1.0, circuit_s=5.0, prefix="t19:")
    try:
        await tier.warm()
        restarted.stop()
        restarted.start()  # every pooled connection is now stale
        assert await tier.set("k", b"v", 60) is True
        assert tier.healthy and tier.failures == 0
    finally:
        await tier.close()
        restarted.stop()


async def test_work_after_the_response_is_let_go_of_once_done(server: RedisServer) -> None:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="t20:")
    try:
        tier.spawn(tier.set("k", b"v", 60))
        for _ in range(100):
            if not tier._background:
                break
            await asyncio.sleep(0.01)
        assert not tier._background
    finally:
        await tier.close()


async def test_closing_waits_for_work_after_the_response_for_a_second_at_most(
        server: RedisServer) -> None:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="t21:")
    tier.spawn(tier.set("k", b"v", 60))
    never = asyncio.Event()
    tier.spawn(never.wait())
    started = time.monotonic()
    async with asyncio.timeout(5):
        await tier.close()
    assert 0.9 <= time.monotonic() - started < 1.8
    assert "t21:k" in server.stored()
    never.set()


class _NoGoodbye:
    async def aclose(self) -> None:
        await asyncio.Event().wait()


async def test_a_goodbye_redis_never_completes_is_waited_for_two_seconds(
        caplog: pytest.LogCaptureFixture) -> None:
    tier = RedisTier(f"redis://127.0.0.1:{closed_port()}/0", timeout_s=0.5, circuit_s=1.0)
    await tier.close()
    tier._client = _NoGoodbye()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sidecar.cache"):
        async with asyncio.timeout(5):
            await tier.close()
    assert 1.9 <= time.monotonic() - started < 2.8
    assert [r.getMessage() for r in caplog.records] == [
        "redis did not close its connections in 2 s"]


async def test_a_cluster_tier_that_never_connected_closes(server: RedisServer) -> None:
    await RedisTier(server.url, timeout_s=0.5, circuit_s=1.0, cluster=True).close()


async def test_a_flush_of_many_answers_reads_sixteen_at_a_time_and_counts_every_batch(
        server: RedisServer) -> None:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="t22:")
    keys = [hashlib.sha256(b"%d" % i).hexdigest() for i in range(40)]
    try:
        for key in keys:
            await tier.set(key, b"alice", 60)
        await tier.set(hashlib.sha256(b"bob").hexdigest(), b"bob", 60)
        redis_cli(server, "CONFIG", "RESETSTAT")
        dropped = await tier.drop_answers(batch=1000, whose=lambda _, v: v == b"alice")
        assert dropped == 40  # every one of them read, none skipped
        assert calls(server, "mget") == 3  # 41 keys in one step: 16 + 16 + 9
        assert [k for k in server.stored() if k.startswith("t22:")] == [
            "t22:" + hashlib.sha256(b"bob").hexdigest()]
        for key in keys:
            await tier.set(key, b"alice", 60)
        assert await tier.drop_answers(batch=3) == 41  # many steps, each one counted
        assert not [k for k in server.stored() if k.startswith("t22:")]
    finally:
        await tier.close()


async def test_a_connection_idle_for_a_while_is_not_pinged_before_a_command(
        server: RedisServer) -> None:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="t23:")
    try:
        await tier.get("k")
        await asyncio.sleep(1.1)  # past a health check interval of a second
        redis_cli(server, "CONFIG", "RESETSTAT")
        await tier.get("k")
        assert calls(server, "ping") == 0
    finally:
        await tier.close()
