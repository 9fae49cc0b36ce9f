"""The shared cache tier on a real redis-server, started here on a free port and owned by
these tests: sharing between sidecars, tenants, a dead or frozen Redis, cancellation storms."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sidecar.cache.memory import MemoryCache
from sidecar.cache.records import Record
from sidecar.cache.redis_tier import RedisTier
from sidecar.cache.response_cache import ResponseCache
from tests.support.redis_server import RedisServer
from tests.support.sidecar import Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

SECRET = "fleet-cache-secret-0123456789abcdef"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def redis_config(mock: MockUpstream, redis: RedisServer, circuit_s: float = 1.0) -> str:
    return base_config(mock, extra=f"""
[cache]
enabled = true
redis_url = "{redis.url}"
secret_env = "SIDECAR_CACHE_SECRET"
timeout_ms = 100
circuit_s = {circuit_s}
""")


def start(mock: MockUpstream, redis: RedisServer, workdir: Path) -> Sidecar:
    return start_sidecar(redis_config(mock, redis), workdir,
                         env={"SIDECAR_CACHE_SECRET": SECRET})


@contextlib.contextmanager
def fleet(config: str, workdir: Path) -> Iterator[tuple[Sidecar, Sidecar]]:
    """Two sidecars with one config, one Redis and the fleet's secret."""
    env = {"SIDECAR_CACHE_SECRET": SECRET}
    one = start_sidecar(config, workdir / "one", env=env)
    try:
        two = start_sidecar(config, workdir / "two", env=env)
        try:
            yield one, two
        finally:
            two.stop()
    finally:
        one.stop()


def ask(sidecar: Sidecar, **body: object) -> httpx.Response:
    return httpx.post(sidecar.base_url + "/chat/completions", timeout=30,
                      json={"model": "gpt-test", "messages": USER, "temperature": 0, **body})


def test_two_sidecars_share_answers_through_redis(
        upstream: MockUpstream, redis_server: RedisServer, tmp_path: Path) -> None:
    with fleet(redis_config(upstream, redis_server), tmp_path) as (one, two):
        assert ask(one, max_tokens=5).headers["x-sidecar-cache"] == "miss"
        deadline = time.monotonic() + 2  # the Redis write follows the response
        while not redis_server.stored() and time.monotonic() < deadline:
            time.sleep(0.02)
        shared = ask(two, max_tokens=5)
        assert shared.headers["x-sidecar-cache"] == "hit"
        assert shared.json()["choices"][0]["message"]["content"] == "Hello from mock: hi"
        assert upstream.count() == 1
        # A recorded stream is shared the same way.
        with httpx.stream("POST", one.base_url + "/chat/completions", json={
                "model": "gpt-test", "messages": USER, "temperature": 0, "stream": True,
                "max_tokens": 6}) as stream:
            assert stream.headers["x-sidecar-cache"] == "miss"
            stream.read()
        time.sleep(0.3)
        assert ask(two, max_tokens=6).headers["x-sidecar-cache"] == "hit"
        assert upstream.count() == 2


def test_a_dead_redis_costs_at_most_the_timeout_and_the_cache_comes_back(
        upstream: MockUpstream, redis_server: RedisServer, tmp_path: Path) -> None:
    sidecar = start(upstream, redis_server, tmp_path)
    try:
        assert ask(sidecar, max_tokens=1).status_code == 200
        redis_server.stop()
        for i in range(20):
            started = time.monotonic()
            reply = ask(sidecar, max_tokens=100 + i)
            assert reply.status_code == 200
            assert time.monotonic() - started < 0.6
        assert sidecar.wait_for_log('"msg":"redis unavailable: serving uncached"')
        stats = httpx.get(sidecar.url + "/admin/api/cache").json()
        assert stats["redis"]["failures"] >= 1 and stats["redis"]["skipped_while_open"] > 0
        assert stats["redis"]["last_error"] == "ConnectionError"
        assert stats["miss"] == 21 and stats["hit"] == 0
        redis_server.start()
        time.sleep(1.2)  # the circuit (1 s) closes
        ask(sidecar, max_tokens=300)
        deadline = time.monotonic() + 2
        while not redis_server.stored() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(redis_server.stored()) == 1
        assert httpx.get(sidecar.url + "/admin/api/cache").json()["redis"]["healthy"] is True
    finally:
        sidecar.stop()


def test_a_frozen_redis_costs_at_most_the_timeout(
        upstream: MockUpstream, redis_server: RedisServer, tmp_path: Path) -> None:
    sidecar = start(upstream, redis_server, tmp_path)
    try:
        assert ask(sidecar, max_tokens=1).status_code == 200
        redis_server.pause()
        try:
            times = []
            for i in range(10):
                started = time.monotonic()
                assert ask(sidecar, max_tokens=200 + i).status_code == 200
                times.append(time.monotonic() - started)
            # The first pays the 100 ms deadline; the open circuit spares the others.
            assert max(times) < 0.6
            assert sorted(times)[len(times) // 2] < 0.1
        finally:
            redis_server.resume()
        assert sidecar.wait_for_log('"reason":"timeout"')
    finally:
        sidecar.stop()


async def test_a_cancellation_storm_never_crosses_replies(redis_server: RedisServer) -> None:
    tier = RedisTier(redis_server.url, timeout_s=2.0, circuit_s=1.0)
    try:
        values = {f"k{i}": os.urandom(64 + i) for i in range(200)}
        await asyncio.gather(*(tier.set(k, v, 60) for k, v in values.items()))
        rng = random.Random(7)
        wrong = 0

        async def read(key: str) -> None:
            nonlocal wrong
            got = await tier.get(key)
            if got is not None and got != values[key]:
                wrong += 1

        for _ in range(20):
            tasks = [asyncio.create_task(read(rng.choice(list(values)))) for _ in range(100)]
            await asyncio.sleep(0)
            for task in rng.sample(tasks, 40):
                task.cancel()  # many are mid-read: their connections hold half a reply
            await asyncio.gather(*tasks, return_exceptions=True)
        checked = await asyncio.gather(*(tier.get(k) for k in values))
        assert wrong == 0
        assert tier.failures == 0, tier.last_error
        assert checked == list(values.values())
    finally:
        await tier.close()


async def test_an_entry_of_another_tenant_or_a_planted_one_is_never_served(
        redis_server: RedisServer) -> None:
    tier = RedisTier(redis_server.url, timeout_s=1.0, circuit_s=1.0)
    cache = ResponseCache(MemoryCache(16, 60), 60, tier, secret=SECRET.encode())
    other = ResponseCache(MemoryCache(16, 60), 60, tier, secret=SECRET.encode())
    try:
        cache.put("key", Record("tenant-a", "json", b'{"x":1}'))
        await asyncio.sleep(0.1)  # the Redis write follows
        assert await other.get("key", "tenant-b") is None
        found = await other.get("key", "tenant-a")
        assert found is not None and found.body == b'{"x":1}'
        # Written by someone without the secret, or moved to another key: not served.
        await tier.set("planted", Record("tenant-a", "json", b'{"x":2}').encode(), 60)
        raw = await tier.get("key")
        assert raw is not None
        await tier.set("moved", raw, 60)
        fresh = ResponseCache(MemoryCache(16, 60), 60, tier, secret=SECRET.encode())
        assert await fresh.get("planted", "tenant-a") is None
        assert await fresh.get("moved", "tenant-a") is None
        assert fresh.counts["forged"] == 2
    finally:
        await tier.close()


def test_a_weight_changed_on_one_sidecar_reaches_the_other_within_a_second(
        upstream: MockUpstream, redis_server: RedisServer, tmp_path: Path) -> None:
    with fleet(redis_config(upstream, redis_server), tmp_path) as (one, two):
        assert two.wait_for_log('"logger":"sidecar"', 5)
        time.sleep(0.3)  # both subscribed
        change = {"model": "gpt-test", "targets": [{"provider": "mock", "weight": 7}]}
        assert httpx.put(one.url + "/admin/api/routes", json=change).status_code == 200
        deadline = time.monotonic() + 1.0
        seen = None
        while time.monotonic() < deadline:
            seen = httpx.get(two.url + "/admin/api/routes").json()["models"]["gpt-test"]
            if seen[0]["weight"] == 7:
                break
            time.sleep(0.02)
        assert seen is not None and seen[0]["weight"] == 7
        assert two.wait_for_log('"via":"redis"')
        # Applied there as a change of its own: kept in its state file too.
        assert '"weight": 7.0' in (tmp_path / "two" / "routes.json").read_text()
        # An invalid change is refused where it is made and never published.
        bad = {"model": "gpt-test", "targets": [{"provider": "mock", "weight": -1}]}
        assert httpx.put(one.url + "/admin/api/routes", json=bad).status_code == 400
        # Whoever can write to the Redis but lacks the fleet's secret steers nothing.
        body = json.dumps({"origin": "x", "model": "gpt-test",
                           "targets": [{"provider": "mock", "weight": 0.5}]})
        for forged in (body, json.dumps({"body": body, "sig": "0" * 64})):
            subprocess.run(["redis-cli", "-p", str(redis_server.port), "PUBLISH", "sc:routes",
                            forged], check=True, capture_output=True)
        assert two.wait_for_log("unsigned or forged route change")
        time.sleep(0.2)
        assert httpx.get(two.url + "/admin/api/routes").json()["models"]["gpt-test"][0][
            "weight"] == 7


def test_rate_limits_hold_across_sidecars_and_fall_back_to_each_one(
        upstream: MockUpstream, redis_server: RedisServer, tmp_path: Path) -> None:
    config = redis_config(upstream, redis_server) + "\n[limits]\nrequests_per_minute = 4\n"
    with fleet(config, tmp_path) as (one, two):
        statuses = [ask(sidecar, temperature=0.5).status_code
                    for sidecar in (one, two, one, two, one, two)]
        assert statuses == [200, 200, 200, 200, 429, 429]
        refused = ask(one, temperature=0.5)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["Retry-After"]) >= 1
        assert any(key.startswith("sc:rl:requests:") for key in redis_server.stored())
        # Without Redis, each sidecar counts on its own again: limited, never an error.
        redis_server.stop()
        alone = [ask(one, temperature=0.5).status_code for _ in range(6)]
        assert alone.count(200) == 4 and set(alone) == {200, 429}


def test_token_budgets_are_reserved_and_settled_in_redis(
        upstream: MockUpstream, redis_server: RedisServer, tmp_path: Path) -> None:
    import hashlib

    config = redis_config(upstream, redis_server) + "\n[limits]\ntokens_per_minute = 300\n"
    key = "sc:rl:tokens:" + hashlib.sha256(b"anonymous").hexdigest()[:32]

    def level() -> float:
        out = subprocess.run(["redis-cli", "-p", str(redis_server.port), "HGET", key, "l"],
                             capture_output=True, text=True)
        return float(out.stdout.strip())

    with fleet(config, tmp_path) as (one, two):
        # Each answer reports about a dozen tokens used; ~125 are reserved first (prompt
        # estimate + max_tokens), the rest given back once the usage is known.
        for sidecar in (one, two):
            assert ask(sidecar, temperature=0.5, max_tokens=100).status_code == 200
        time.sleep(0.2)  # the settlement is written after the response
        # Unsettled, two reservations would leave ~50; untouched, 300.
        assert 250 <= level() < 290
        too_big = ask(one, temperature=0.5, max_tokens=400)
        assert too_big.status_code == 429


def test_identical_misses_on_two_sidecars_make_one_upstream_call(
        upstream: MockUpstream, redis_server: RedisServer, tmp_path: Path) -> None:

    async def storm() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)
                                     ) as client:
            return await asyncio.gather(*(client.post(
                sidecar.base_url + "/chat/completions",
                json={"model": "gpt-test", "messages": USER, "temperature": 0,
                      "mock": {"delay_s": 0.5, "key": "fleet-storm"}})
                for sidecar in (one, two) * 50))

    with fleet(redis_config(upstream, redis_server), tmp_path) as (one, two):
        answers = asyncio.run(storm())
        assert {a.status_code for a in answers} == {200}
        assert len({a.json()["choices"][0]["message"]["content"] for a in answers}) == 1
        assert upstream.count() == 1
        states = [a.headers["x-sidecar-cache"] for a in answers]
        assert states.count("miss") == 1 and states.count("hit") == 99


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """Three masters on free ports, joined into one Redis Cluster."""
    nodes = []
    for i in range(3):
        node = RedisServer(tmp_path / f"node{i}")
        node.workdir.mkdir()
        node.extra = ["--cluster-enabled", "yes", "--cluster-config-file",
                      str(node.workdir / "nodes.conf")]
        node.start()
        nodes.append(node)
    try:
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0",
                        "--cluster-yes"], capture_output=True, check=True, timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            info = subprocess.run(["redis-cli", "-p", str(nodes[0].port), "cluster", "info"],
                                  capture_output=True, text=True).stdout
            if "cluster_state:ok" in info:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the cluster did not form")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def test_a_redis_cluster_serves_the_fleet(upstream: MockUpstream,
                                          redis_cluster: list[RedisServer],
                                          tmp_path: Path) -> None:
    config = redis_config(upstream, redis_cluster[0]).replace(
        "circuit_s = 1.0", "circuit_s = 1.0\ncluster = true") + \
        "\n[limits]\nrequests_per_minute = 1000\n"
    with fleet(config, tmp_path) as (one, two):
        for i in range(6):  # keys spread over the three nodes' slots
            assert ask(one, max_tokens=500 + i).headers["x-sidecar-cache"] == "miss"
        time.sleep(0.3)
        for i in range(6):
            assert ask(two, max_tokens=500 + i).headers["x-sidecar-cache"] == "hit"
        assert upstream.count() == 6
        assert sum(len(node.stored()) for node in redis_cluster) >= 6
        assert sum(1 for node in redis_cluster if node.stored()) >= 2
        change = {"model": "gpt-test", "targets": [{"provider": "mock", "weight": 4}]}
        assert httpx.put(one.url + "/admin/api/routes", json=change).status_code == 200
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            models = httpx.get(two.url + "/admin/api/routes").json()["models"]
            if models["gpt-test"][0]["weight"] == 4:
                break
            time.sleep(0.02)
        assert models["gpt-test"][0]["weight"] == 4
        assert httpx.get(one.url + "/admin/api/cache").json()["redis"]["failures"] == 0


def test_rediss_is_a_real_tls_handshake(upstream: MockUpstream, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, "-m", "sidecar", "gen-cert", "--out", str(certs),
                    "--hosts", "127.0.0.1"], check=True, capture_output=True)
    server = RedisServer(tmp_path)
    server.extra = ["--port", "0", "--tls-port", str(server.port),
                    "--tls-cert-file", str(certs / "cert.pem"),
                    "--tls-key-file", str(certs / "key.pem"),
                    "--tls-ca-cert-file", str(certs / "ca.pem"), "--tls-auth-clients", "no"]
    server.ping_args = ["--tls", "--cacert", str(certs / "ca.pem")]
    server.start()
    try:
        url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={certs / 'ca.pem'}"
        config = redis_config(upstream, server).replace(server.url, url)
        sidecar = start_sidecar(config, tmp_path / "sidecar",
                                env={"SIDECAR_CACHE_SECRET": SECRET})
        try:
            assert ask(sidecar, max_tokens=900).headers["x-sidecar-cache"] == "miss"
            time.sleep(0.3)
            stored = subprocess.run(["redis-cli", "-p", str(server.port), *server.ping_args,
                                     "--scan"], capture_output=True, text=True).stdout.split()
            assert len(stored) == 1
            assert httpx.get(sidecar.url + "/admin/api/cache").json()["redis"]["failures"] == 0
        finally:
            sidecar.stop()
        # A plain-text client gets nothing from the TLS port.
        plain = subprocess.run(["redis-cli", "-p", str(server.port), "ping"],
                               capture_output=True, text=True, timeout=10)
        assert "PONG" not in plain.stdout
    finally:
        server.stop()


def test_redis_entries_expire_with_the_ttl(upstream: MockUpstream, redis_server: RedisServer,
                                           tmp_path: Path) -> None:
    config = redis_config(upstream, redis_server).replace("[cache]\n", "[cache]\nttl_s = 1\n")
    with fleet(config, tmp_path) as (one, two):
        assert ask(one, max_tokens=77).headers["x-sidecar-cache"] == "miss"
        time.sleep(0.2)
        [key] = redis_server.stored()
        ttl = subprocess.run(["redis-cli", "-p", str(redis_server.port), "PTTL", key],
                             capture_output=True, text=True).stdout.strip()
        assert 0 < int(ttl) <= 1000
        assert ask(two, max_tokens=77).headers["x-sidecar-cache"] == "hit"
        time.sleep(1.1)
        assert redis_server.stored() == []
        assert ask(two, max_tokens=77).headers["x-sidecar-cache"] == "miss"
        assert upstream.count() == 2


async def test_the_cache_comes_back_at_once_after_a_redis_restart(
        redis_server: RedisServer) -> None:
    # A circuit far longer than the test: any failure on a stale connection would show.
    tier = RedisTier(redis_server.url, timeout_s=1.0, circuit_s=60.0)
    try:
        # Fill the pool with connections that all go stale when the server restarts.
        await asyncio.gather(*(tier.set(f"k{i}", b"v", 60) for i in range(32)))
        await asyncio.to_thread(redis_server.stop)
        await asyncio.to_thread(redis_server.start)
        # A burst on the pooled connections, as the first requests after a restart make.
        await asyncio.gather(*(tier.set(f"n{i}", b"fresh", 60) for i in range(32)))
        assert tier.failures == 0, tier.last_error
        assert tier.healthy
        assert await tier.get("n31") == b"fresh"
    finally:
        await tier.close()


async def test_a_kept_stream_that_did_not_end_well_is_neither_stored_nor_served(
        redis_server: RedisServer) -> None:
    tier = RedisTier(redis_server.url, timeout_s=1.0, circuit_s=1.0)
    cache = ResponseCache(MemoryCache(16, 60), 60, tier, secret=SECRET.encode())
    unfinished = Record("tenant-a", "stream", chunks=[
        b'{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"x"},'
        b'"finish_reason":null}]}'])
    try:
        cache.put("key", unfinished)
        await asyncio.sleep(0.1)  # a Redis write would have followed
        assert redis_server.stored() == []
        # As a version that stored broken streams kept it: signed with the fleet's secret.
        body = unfinished.encode()
        mac = hmac.new(SECRET.encode(), b"record\0key\0" + body, hashlib.sha256).hexdigest()
        await tier.set("key", mac.encode() + b"." + body, 60)
        assert await cache.get("key", "tenant-a") is None
        assert cache.counts["forged"] == 0  # genuine, but not servable
    finally:
        await tier.close()
