"""Weight changes shared by a fleet: published on Redis by the sidecar that made one, applied
by every other sidecar on the same Redis within a second. Redis being away costs nothing but
the sharing: each sidecar keeps serving with the weights it has, and resubscribes."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from typing import Any

import orjson

from sidecar.errors import InvalidRequest
from sidecar.observability.audit import Actor, AuditTrail
from sidecar.routing.state import RouteState
from sidecar.routing.table import RouteTable

log = logging.getLogger("sidecar.routing")
CHANNEL = "sc:routes"


class RouteSync:
    def __init__(self, url: str, table: RouteTable, state: RouteState, timeout_s: float,
                 secret: bytes, audit: AuditTrail | None = None) -> None:
        import redis.asyncio as aioredis

        # Messages are signed with the fleet's secret: whoever can write to the Redis but
        # does not hold it cannot steer the fleet's traffic.
        self._secret = secret

        self._redis: Any = aioredis.Redis.from_url(url, socket_connect_timeout=timeout_s)
        self._table = table
        self._state = state
        self._audit = audit or AuditTrail()
        self._timeout = max(timeout_s, 0.5)
        self.origin = os.urandom(8).hex()  # this process: its own messages are not applied

    def _sign(self, body: bytes) -> str:
        return hmac.new(self._secret, b"routes\0" + body, hashlib.sha256).hexdigest()

    async def publish(self, model: str, targets: list[dict[str, Any]]) -> bool:
        body = orjson.dumps({"origin": self.origin, "model": model, "targets": targets})
        message = orjson.dumps({"body": body.decode(), "sig": self._sign(body)})
        try:
            async with asyncio.timeout(self._timeout):
                await self._redis.publish(CHANNEL, message)
        except Exception as exc:  # noqa: BLE001 - the change holds here; sharing it failed
            log.warning("route change not shared: redis unavailable",
                        extra={"fields": {"model": model, "error": type(exc).__name__}})
            return False
        return True

    async def run(self) -> None:
        """Apply changes published by other sidecars, for as long as the app runs."""
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            await self._apply(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: try again shortly
                log.warning("route sharing paused: redis unavailable",
                            extra={"fields": {"error": type(exc).__name__}})
                await asyncio.sleep(1.0)

    async def _apply(self, data: Any) -> None:
        try:
            envelope = orjson.loads(data)
            body, sig = envelope["body"].encode(), envelope["sig"]
            if not isinstance(sig, str) or not hmac.compare_digest(sig, self._sign(body)):
                log.warning("unsigned or forged route change on redis; ignored")
                return
            change = orjson.loads(body)
            origin, model, targets = change["origin"], change["model"], change["targets"]
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return
        if origin == self.origin:
            return
        state = self._state
        async with state.lock:
            try:
                # Checked as a change made here is: a signed message may still come from a
                # sidecar of another version, or with another config.
                before, after = self._table.update(model, targets)
            except InvalidRequest as exc:
                log.warning("shared route change does not fit this config; ignored",
                            extra={"fields": {"model": str(model)[:100],
                                              "reason": exc.message}})
                return
            state.changed[model] = after
            await asyncio.to_thread(state.write)
        # Kept with this sidecar's own changes: its admin page shows who changed what.
        self._audit.record("routes changed", Actor(f"sidecar {str(origin)[:16]}", None, ""),
                           model, before, after, model=model, via="redis")

    async def close(self) -> None:
        try:  # a Redis that does not answer the goodbye is not waited for
            async with asyncio.timeout(2.0):
                await self._redis.aclose()
        except TimeoutError:
            log.warning("redis did not close the route-sharing connection in 2 s")
