"""Per-tenant request and token budgets, and a process-wide cap on requests in flight.

Budgets are token buckets refilled continuously: a tenant may burst up to a minute's budget,
then gets a 429 that says how long until enough has refilled.
"""

from __future__ import annotations

import math
import time

from sidecar.config import LimitsSettings
from sidecar.errors import RateLimited, Unavailable


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
            if amount > self.capacity:
                raise RateLimited(
                    f"This request needs {amount:.0f} {self.what}, more than the "
                    f"{self.capacity:.0f} a minute this tenant may use.",
                    code="rate_limit_exceeded",
                )
            wait = (amount - bucket.level) / self.rate
            raise RateLimited(
                f"Rate limit reached: {self.capacity:.0f} {self.what} per minute. "
                f"Try again in {wait:.1f}s.",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        bucket.level -= amount

    def give_back(self, tenant: str, amount: float) -> None:
        """Settle a reservation: positive returns what was not used, negative takes more."""
        bucket = self._buckets.get(tenant)
        if bucket is not None:
            bucket.level = min(self.capacity, bucket.level + amount)

    def _forget_full(self, now: float) -> None:
        for tenant, bucket in list(self._buckets.items()):
            if bucket.level + (now - bucket.stamp) * self.rate >= self.capacity:
                del self._buckets[tenant]


class Limiter:
    def __init__(self, settings: LimitsSettings) -> None:
        self.settings = settings
        self.requests = Budget(settings.requests_per_minute, "requests") \
            if settings.requests_per_minute else None
        self.tokens = Budget(settings.tokens_per_minute, "tokens") \
            if settings.tokens_per_minute else None
        self.in_flight = 0

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
