"""Budgets without a sidecar: the exact 429 and 503 a client reads, and the fleet's budgets in a
real redis-server (shared by two limiters, settled afterwards, replaced by the process's own
bucket when Redis does not answer)."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess

import pytest

from sidecar.cache.redis_tier import RedisTier
from sidecar.errors import RateLimited, Unavailable
from sidecar.security.limits import Budget, Limiter, SharedBudget
from sidecar.settings import LimitsSettings
from tests.support.redis_server import RedisServer
from tests.support.sidecar import closed_port


def test_a_request_over_a_minutes_budget_says_how_much_it_needs() -> None:
    budget = Budget(100, "tokens")
    with pytest.raises(RateLimited) as caught:
        budget.take("t", 101, now=0.0)
    assert caught.value.message == (
        "This request needs 101 tokens, more than the 100 a minute this tenant may use.")
    assert caught.value.code == "rate_limit_exceeded"
    assert budget.too_large(100) is None


def test_a_rate_limit_says_the_budget_and_the_wait() -> None:
    budget = Budget(60, "requests")
    budget.take("t", 60, now=0.0)
    with pytest.raises(RateLimited) as caught:
        budget.take("t", 2, now=0.5)
    assert caught.value.message == "Rate limit reached: 60 requests per minute. Try again in 1.5s."
    assert caught.value.headers["Retry-After"] == "2"
    assert budget.limited(0.2).headers["Retry-After"] == "1"


def test_a_negative_settlement_takes_more_and_an_unknown_tenant_is_ignored() -> None:
    budget = Budget(60, "tokens")
    budget.take("t", 10, now=0.0)
    budget.give_back("t", -20)
    budget.give_back("nobody", 5)
    with pytest.raises(RateLimited):
        budget.take("t", 31, now=0.0)
    budget.take("t", 30, now=0.0)


def test_only_full_buckets_are_forgotten() -> None:
    budget = Budget(60, "requests")
    budget.take("spent", 60, now=0.0)
    budget.take("idle", 1, now=0.0)
    budget._forget_full(1.0)  # idle refilled its one request in a second; spent did not
    assert set(budget._buckets) == {"spent"}


def test_the_in_flight_cap_says_its_limit() -> None:
    limiter = Limiter(LimitsSettings(max_concurrent_requests=2))
    limiter.enter()
    limiter.enter()
    with pytest.raises(Unavailable) as caught:
        limiter.enter()
    assert caught.value.message == (
        "The sidecar is at its limit of 2 requests in flight; try again shortly.")
    assert caught.value.code == "overloaded" and caught.value.headers == {"Retry-After": "1"}
    limiter.leave()
    assert limiter.in_flight == 1
    limiter.enter()


async def test_two_limiters_on_one_redis_share_a_tenants_budget(server: RedisServer) -> None:
    tiers = [RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="l1:")
             for _ in range(2)]
    try:
        limiters = [Limiter(LimitsSettings(requests_per_minute=3, tokens_per_minute=0))
                    for _ in tiers]
        for limiter, tier in zip(limiters, tiers, strict=True):
            limiter.share(tier)
            assert limiter.shared_tokens is None
        first, second = (limiter.shared_requests for limiter in limiters)
        assert first is not None and second is not None
        await first.take("alice", 2)
        await second.take("alice", 1)
        with pytest.raises(RateLimited) as caught:
            await second.take("alice", 1)
        assert 1 <= int(caught.value.headers["Retry-After"]) <= 20
        assert "Try again in" in caught.value.message
        await second.take("bob", 3)  # another tenant, another bucket
        keys = server.stored()
        assert not any("alice" in key for key in keys)
        assert any(key.startswith("l1:rl:requests:") for key in keys)
    finally:
        for tier in tiers:
            await tier.close()


async def test_the_wait_redis_reports_in_milliseconds_reaches_the_client_in_seconds(
        server: RedisServer) -> None:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="l5:")
    try:
        shared = SharedBudget(Budget(60_000, "tokens"), tier)  # one a millisecond
        # The tenant's bucket, named by the digest of its name: empty, and stamped in the
        # future so that Redis's clock refills nothing before the check.
        digest = hashlib.sha256(b"alice").hexdigest()[:32]
        subprocess.run(["redis-cli", "-p", str(server.port), "HSET", f"l5:rl:tokens:{digest}",
                        "l", "0", "s", str(10**15)], check=True, capture_output=True)
        with pytest.raises(RateLimited) as caught:
            await shared.take("alice", 60_000)
        assert caught.value.message.endswith("Try again in 60.0s.")
        assert caught.value.headers["Retry-After"] == "60"
    finally:
        await tier.close()


async def test_a_limiter_shares_its_token_budget_too(server: RedisServer) -> None:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="l6:")
    try:
        limiter = Limiter(LimitsSettings(requests_per_minute=0, tokens_per_minute=5))
        limiter.share(tier)
        assert limiter.shared_requests is None
        shared = limiter.shared_tokens
        assert shared is not None and shared.local is limiter.tokens
        await shared.take("alice", 5)
        with pytest.raises(RateLimited):
            await shared.take("alice", 1)
        assert any(key.startswith("l6:rl:tokens:") for key in server.stored())
    finally:
        await tier.close()


async def test_a_settlement_returns_budget_to_the_fleet(server: RedisServer) -> None:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="l2:")
    try:
        shared = SharedBudget(Budget(100, "tokens"), tier)
        await shared.take("alice", 100)
        shared.give_back("alice", 60)
        shared.give_back("alice", 0)
        for _ in range(50):
            await asyncio.sleep(0.01)
            try:
                await shared.take("alice", 50)
                break
            except RateLimited:
                continue
        else:
            pytest.fail("the settlement never reached Redis")
        with pytest.raises(RateLimited):
            await shared.take("alice", 50)
    finally:
        await tier.close()


async def test_a_request_too_large_for_the_budget_never_reaches_redis(
        server: RedisServer) -> None:
    tier = RedisTier(server.url, timeout_s=1.0, circuit_s=1.0, prefix="l3:")
    try:
        shared = SharedBudget(Budget(10, "tokens"), tier)
        with pytest.raises(RateLimited) as caught:
            await shared.take("alice", 11)
        assert caught.value.code == "rate_limit_exceeded"
        assert not any(key.startswith("l3:") for key in server.stored())
    finally:
        await tier.close()


async def test_without_redis_the_process_bucket_decides() -> None:
    tier = RedisTier(f"redis://127.0.0.1:{closed_port()}", timeout_s=0.2, circuit_s=5.0,
                     prefix="l4:")
    try:
        local = Budget(2, "requests")
        shared = SharedBudget(local, tier)
        await shared.take("alice", 1)
        await shared.take("alice", 1)
        with pytest.raises(RateLimited):
            await shared.take("alice", 1)
        assert local._buckets["alice"].level < 1
    finally:
        await tier.close()


async def test_without_redis_a_settlement_returns_to_the_process_bucket() -> None:
    tier = RedisTier(f"redis://127.0.0.1:{closed_port()}", timeout_s=0.2, circuit_s=5.0,
                     prefix="l5:")
    try:
        shared = SharedBudget(Budget(100, "tokens"), tier)
        await shared.take("alice", 100)  # reserved in this process's bucket: Redis is away
        shared.give_back("alice", 60)  # the answer used 40
        await shared.take("alice", 50)
        with pytest.raises(RateLimited):
            await shared.take("alice", 50)
    finally:
        await tier.close()
