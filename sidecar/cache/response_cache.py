"""The response cache a request sees: deterministic requests keyed per tenant, the in-process
tier in front of the shared Redis tier, records sealed with the fleet's secret."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from sidecar.cache.memory import MemoryCache
from sidecar.cache.records import Record, as_json, servable

if TYPE_CHECKING:
    from sidecar.cache.redis_tier import RedisTier

# Fields that do not change what the model answers, or how: left out of the key.
_NOT_IN_KEY = frozenset({"stream", "stream_options", "user", "metadata", "store"})


def cache_key(secret: bytes, tenant: str, endpoint: str, payload: dict[str, Any]) -> str:
    """An HMAC of the tenant (from the verified token, never from the body), the endpoint and the
    canonical request: every field but those that cannot change the answer, keys sorted."""
    canonical = {k: v for k, v in payload.items() if k not in _NOT_IN_KEY}
    message = b"\0".join((tenant.encode(), endpoint.encode(),
                          orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)))
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def deterministic(payload: dict[str, Any]) -> bool:
    """Temperature 0 or a seed: the same request should get the same answer."""
    return payload.get("temperature") == 0 or payload.get("seed") is not None



class ResponseCache:
    """The in-process tier in front of the shared Redis tier (when one is configured)."""

    def __init__(self, memory: MemoryCache, ttl_s: float, shared: RedisTier | None = None,
                 lock_s: float = 10.0, secret: bytes = b"") -> None:
        self.memory = memory
        self.shared = shared
        self._ttl = ttl_s
        self._secret = secret or os.urandom(32)
        # How long one sidecar may hold the fleet's lock on a key while it fetches.
        self.lock_s = lock_s
        self.counts = {"hit": 0, "miss": 0, "bypass": 0, "forged": 0}

    def _seal(self, key: str, record: Record) -> bytes:
        """The record as stored in Redis, signed with the fleet's secret (and bound to its
        key), so that whoever can write to the Redis cannot plant or move an answer."""
        body = record.encode()
        return self._mac(key, body) + b"." + body

    def _open(self, key: str, raw: bytes | None) -> Record | None:
        if not raw:
            return None
        mac, _, body = raw.partition(b".")
        if not hmac.compare_digest(mac, self._mac(key, body)):
            self.counts["forged"] += 1
            return None
        return Record.decode(body)

    async def drop_in_redis(self, tenant: str | None) -> int | None:
        """Drop kept answers from Redis: all, or one tenant's (each is read and its signed
        record says whose it is, since the key, an HMAC, does not). None: not done."""
        if self.shared is None:
            return None
        if tenant is None:
            return await self.shared.drop_answers()

        def whose(key: str, raw: bytes) -> bool:
            record = self._open(key, raw)
            return record is not None and record.tenant == tenant

        return await self.shared.drop_answers(whose=whose)

    def _mac(self, key: str, body: bytes) -> bytes:
        message = b"record\0" + key.encode() + b"\0" + body
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest().encode()

    def describe(self) -> dict[str, Any]:
        """What the admin API shows: how the cache is doing, and Redis with it."""
        info: dict[str, Any] = {**self.counts, "memory_entries": len(self.memory)}
        if self.shared is not None:
            info["redis"] = self.shared.describe()
        return info

    async def get(self, key: str, tenant: str) -> Record | None:
        record = self.memory.get(key, tenant)
        if record is not None or self.shared is None:
            return record
        record = self._open(key, await self.shared.get(key))
        if record is None or record.tenant != tenant:
            return None  # the key binds the tenant; the stored owner is checked all the same
        if not servable(record):
            return None  # kept by a version that stored broken streams: a miss
        self.memory.put(key, tenant, record)
        return record

    def put(self, key: str, record: Record) -> None:
        """Keep an answer, unless it is not one that can be served again (a stream that
        broke, carried an error event or never finished); the Redis write goes on after the
        response, off its path."""
        if not servable(record):
            return
        self.memory.put(key, record.tenant, record)
        if self.shared is not None:
            self.shared.spawn(self.shared.set(key, self._seal(key, record), self._ttl))

    async def single_flight(self, key: str, tenant: str,
                            fetch: Callable[[], Awaitable[bytes]], *, fleet: bool = True
                            ) -> tuple[bytes, bool]:
        """One upstream call for identical misses in flight: in this process, and (`fleet`)
        across the fleet through a short Redis lock whose holder stores the answer before
        letting go."""
        shared = self.shared
        if shared is None or not fleet:
            return await self.memory.single_flight(key, fetch)
        fleet_shared = False

        async def fleet_fetch() -> bytes:
            nonlocal fleet_shared
            token = os.urandom(8).hex()
            held = await shared.lock(key, token, self.lock_s)
            if held is False:  # another sidecar is fetching: wait for what it stores
                answer = await self._wait_for_fleet(key, tenant)
                if answer is not None:
                    fleet_shared = True
                    return answer
            try:
                answer = await fetch()
                record = Record(tenant, "json", answer)
                if held and servable(record):
                    self.memory.put(key, tenant, record)
                    await shared.set(key, self._seal(key, record), self._ttl)
                return answer
            finally:
                if held:
                    await shared.unlock(key, token)

        answer, waited = await self.memory.single_flight(key, fleet_fetch)
        return answer, waited or fleet_shared

    async def _wait_for_fleet(self, key: str, tenant: str) -> bytes | None:
        """The answer another sidecar is fetching, once it is stored; None if it gave up (or
        took longer than the lock lasts)."""
        assert self.shared is not None
        deadline = time.monotonic() + self.lock_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            record = self._open(key, await self.shared.get(key))
            if record is not None and record.tenant == tenant:
                return as_json(record)
            if not await self.shared.locked(key):
                record = self._open(key, await self.shared.get(key))
                if record is not None and record.tenant == tenant:
                    return as_json(record)
                return None
        return None
