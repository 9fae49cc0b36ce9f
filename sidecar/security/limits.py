"""Per-tenant request and token budgets, and a process-wide cap on requests in flight.

Budgets are token buckets refilled continuously: a tenant may burst up to a minute's budget,
then gets a 429 that says how long until enough has refilled. With Redis, the buckets live
there (one script per check, on Redis's clock), so the limits hold across a fleet; whenever
Redis does not answer in time, this process's own buckets stand in.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import TYPE_CHECKING, Any

from sidecar.errors import RateLimited, Unavailable
from sidecar.settings import LimitsSettings

if TYPE_CHECKING:
    from sidecar.cache.redis_tier import RedisTier


class Bucket:
    __slots__ = ("level", "stamp")

    def __init__(self, level: float, stamp: float) -> None:
        self.level = level
        self.stamp = stamp


class Budget:
    """One bucket per tenant, `per_minute` deep, refilled at per_minute / 60 a second."""

    def __init__(self, per_minute: int, what: str) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.what = what
        self._buckets: dict[str, Bucket] = {}

    def _bucket(self, tenant: str, now: float) -> Bucket:
        bucket = self._buckets.get(tenant)
        if bucket is None:
            if len(self._buckets) >= 100_000:
                self._forget_full(now)
            bucket = self._buckets[tenant] = Bucket(self.capacity, now)
        else:
            bucket.level = min(self.capacity, bucket.level + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        return bucket

    def take(self, tenant: str, amount: float, now: float | None = None) -> None:
        """Take `amount` or raise RateLimited with the wait until it would fit."""
        now = time.monotonic() if now is None else now
        bucket = self._bucket(tenant, now)
        if amount > bucket.level:
            refused = self.too_large(amount)
            if refused is not None:
                raise refused
            raise self.limited((amount - bucket.level) / self.rate)
        bucket.level -= amount

    def too_large(self, amount: float) -> RateLimited | None:
        if amount <= self.capacity:
            return None
        return RateLimited(
            f"This request needs {amount:.0f} {self.what}, more than the "
            f"{self.capacity:.0f} a minute this tenant may use.",
            code="rate_limit_exceeded",
        )

    def limited(self, wait: float) -> RateLimited:
        return RateLimited(
            f"Rate limit reached: {self.capacity:.0f} {self.what} per minute. "
            f"Try again in {wait:.1f}s.",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    def give_back(self, tenant: str, amount: float) -> None:
        """Settle a reservation: positive returns what was not used, negative takes more."""
        bucket = self._buckets.get(tenant)
        if bucket is not None:
            bucket.level = min(self.capacity, bucket.level + amount)

    def _forget_full(self, now: float) -> None:
        for tenant, bucket in list(self._buckets.items()):
            if bucket.level + (now - bucket.stamp) * self.rate >= self.capacity:
                del self._buckets[tenant]


# KEYS[1]: the bucket; ARGV: capacity, refill per millisecond, amount. Replies {1, 0} when
# taken, {0, milliseconds until it would fit} when not.
_TAKE = """
local capacity, rate, amount = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local state = redis.call('HMGET', KEYS[1], 'l', 's')
local level, stamp = tonumber(state[1]), tonumber(state[2])
if level == nil then level, stamp = capacity, now end
level = math.min(capacity, level + math.max(0, now - stamp) * rate)
local ttl = math.ceil(capacity / rate) + 1000
if amount > level then
  redis.call('HSET', KEYS[1], 'l', level, 's', now)
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {0, math.ceil((amount - level) / rate)}
end
redis.call('HSET', KEYS[1], 'l', level - amount, 's', now)
redis.call('PEXPIRE', KEYS[1], ttl)
return {1, 0}
"""
# KEYS[1]: the bucket; ARGV: capacity, amount to give back (negative: to take more).
_SETTLE = """
local level = tonumber(redis.call('HGET', KEYS[1], 'l'))
if level == nil then return 0 end
redis.call('HSET', KEYS[1], 'l', math.min(tonumber(ARGV[1]), level + tonumber(ARGV[2])))
return 1
"""


class SharedBudget:
    """A Budget kept in Redis for every sidecar that shares it; `local` stands in."""

    def __init__(self, local: Budget, tier: RedisTier) -> None:
        self.local = local
        self._tier = tier
        self._take = tier.script(_TAKE)
        self._settle = tier.script(_SETTLE)
        self._rate_ms = local.rate / 1000.0

    def _key(self, tenant: str) -> str:
        digest = hashlib.sha256(tenant.encode()).hexdigest()[:32]
        return f"rl:{self.local.what}:{digest}"

    async def take(self, tenant: str, amount: float) -> None:
        refused = self.local.too_large(amount)
        if refused is not None:
            raise refused
        reply: Any = await self._tier.run_script(
            self._take, [self._key(tenant)], [self.local.capacity, self._rate_ms, amount])
        if reply is None:  # Redis did not answer: this process's own bucket decides
            self.local.take(tenant, amount)
            return
        if int(reply[0]) != 1:
            raise self.local.limited(int(reply[1]) / 1000.0)

    def give_back(self, tenant: str, amount: float) -> None:
        """Settle where the reservation may have been taken: in Redis, and in this process's
        bucket, which took it while Redis was away (a bucket this process never used is not
        made; one it did use is at most refilled to its capacity)."""
        if amount:
            self.local.give_back(tenant, amount)
            self._tier.spawn(self._tier.run_script(
                self._settle, [self._key(tenant)], [self.local.capacity, amount]))


class Limiter:
    def __init__(self, settings: LimitsSettings) -> None:
        self.settings = settings
        self.requests = Budget(settings.requests_per_minute, "requests") \
            if settings.requests_per_minute else None
        self.tokens = Budget(settings.tokens_per_minute, "tokens") \
            if settings.tokens_per_minute else None
        self.in_flight = 0
        # Set when a Redis is configured: the same budgets, shared by the fleet.
        self.shared_requests: SharedBudget | None = None
        self.shared_tokens: SharedBudget | None = None

    def share(self, tier: RedisTier) -> None:
        if self.requests is not None:
            self.shared_requests = SharedBudget(self.requests, tier)
        if self.tokens is not None:
            self.shared_tokens = SharedBudget(self.tokens, tier)

    def enter(self) -> None:
        """Count a request in, or refuse it at once when the process is full."""
        if self.in_flight >= self.settings.max_concurrent_requests:
            raise Unavailable(
                f"The sidecar is at its limit of {self.settings.max_concurrent_requests} "
                "requests in flight; try again shortly.",
                code="overloaded",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
