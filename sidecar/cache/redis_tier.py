"""The shared tier: answers kept in Redis for every sidecar that uses the same Redis and secret.

Redis is an accelerator, never a dependency: every command has a deadline (`timeout_ms`), a
failure opens a circuit that stops asking for `circuit_s`, and the request goes on uncached.
A command cut short (deadline or cancellation) must not return its connection to the pool with
a reply still on the wire, or the next command would read another's answer: redis-py (>= 4.5.4)
disconnects a connection whose read was interrupted by any exception, cancellation included;
tests/test_redis.py holds it to that under a cancellation storm.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("sidecar.cache")


class RedisTier:
    def __init__(self, url: str, timeout_s: float, circuit_s: float, prefix: str = "sc:",
                 cluster: bool = False) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        self._pool_size = 16
        # No retries of its own: the deadline is the whole budget, then the request goes on.
        no_retry = Retry(NoBackoff(), 0)
        # Except once, at once, on a connection the server closed: after a Redis restart every
        # pooled connection is stale, and each would fail its first command and open the
        # circuit although Redis is back. The retry reconnects that connection first; a Redis
        # that is really away refuses the connect just as fast, and the deadline still holds.
        reconnect_once = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        if cluster:
            # Each key (and each script's one key) lives on the node its slot says.
            self._client: Any = aioredis.RedisCluster.from_url(
                url, max_connections=256, socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s, retry=no_retry, **_anonymous())
        else:
            # A blocking pool: a burst waits (within the deadline) for a connection instead
            # of failing with "too many connections" and opening the circuit. Few connections:
            # a command takes well under a millisecond, while opening a connection costs a
            # millisecond or two of this loop, so a cold burst that opened 64 at once took
            # 80-110 ms (the whole deadline) against 20 ms for 50 commands on 16. Nor does a new
            # connection name the client (CLIENT SETINFO): a round trip each, twice.
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=self._pool_size, timeout=timeout_s, socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s, health_check_interval=0,
                retry=reconnect_once, **_anonymous())
            self._client = aioredis.Redis(connection_pool=pool, retry=no_retry)
        self._timeout = timeout_s
        self._cluster = cluster
        self._circuit_s = circuit_s
        self._open_until = 0.0
        self._prefix = prefix
        self.failures = 0
        self.skipped = 0  # commands not sent because the circuit was open
        self.last_error = ""
        self._background: set[asyncio.Task[Any]] = set()
        self._unlock = self.script(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) "
            "end return 0")

    @property
    def healthy(self) -> bool:
        return self._open_until <= time.monotonic()

    def script(self, source: str) -> Any:
        """A Lua script, run with EVALSHA (and loaded on first use)."""
        return self._client.register_script(source)

    async def run_script(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """The script's reply, or None when Redis did not answer in time (or the circuit is
        open): the caller falls back to what it can do alone."""
        return await self._guarded(lambda: script(keys=[self._prefix + k for k in keys],
                                                  args=args))

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` after the response, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def get(self, key: str) -> bytes | None:
        value = await self._call("GET", self._prefix + key)
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> bool:
        """True once Redis has it; False when it did not answer in time (or the circuit is
        open)."""
        reply = await self._call("SET", self._prefix + key, value, "PX",
                                 max(1, int(ttl_s * 1000)))
        return reply is not None

    async def delete(self, key: str) -> bool:
        """True once Redis has deleted it (or never had it)."""
        return await self._call("DEL", self._prefix + key) is not None

    async def drop_answers(self, within_s: float = 10.0, batch: int = 500,
                           whose: Callable[[str, bytes], bool] | None = None) -> int | None:
        """Delete every kept answer (keys of 64 hex digits under the prefix, not locks,
        sessions or limits), or those `whose(key, value)` says, a batch per command so that
        Redis serves others in between. Returns how many, or None when Redis failed or
        `within_s` ran out before the end. Not on a cluster, whose nodes each hold a part."""
        if self._cluster:
            return None
        deadline = time.monotonic() + within_s
        pattern = self._prefix + "[0-9a-f]" * 64
        cursor: Any = 0
        dropped = 0
        while time.monotonic() < deadline:
            reply = await self._call("SCAN", cursor, "MATCH", pattern, "COUNT", batch)
            if reply is None:
                return None
            cursor, keys = reply
            if keys and whose is not None:
                chosen = []
                start = len(self._prefix)
                for at in range(0, len(keys), 16):  # answers can be large: a few at a time
                    part = keys[at:at + 16]
                    values = await self._call("MGET", *part)
                    if values is None:
                        return None
                    chosen += [k for k, v in zip(part, values, strict=True)
                               if v is not None and whose(_text(k)[start:], v)]
                keys = chosen
            if keys:
                removed = await self._call("UNLINK", *keys)
                if removed is None:
                    return None
                dropped += int(removed)
            if int(cursor) == 0:
                return dropped
        return None

    def describe(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "failures": self.failures,
                "skipped_while_open": self.skipped, "last_error": self.last_error or None}

    async def lock(self, key: str, token: str, ttl_s: float) -> bool | None:
        """Take the lock on `key` for `ttl_s`: True when taken, False when another holds it,
        None when Redis did not answer (then everyone goes on alone)."""
        reply = await self._call("SET", f"{self._prefix}lock:{key}", token, "NX", "PX",
                                 max(1, int(ttl_s * 1000)))
        if reply is None:
            return None if not self.healthy else False
        return True

    async def locked(self, key: str) -> bool:
        return bool(await self._call("EXISTS", f"{self._prefix}lock:{key}"))

    async def unlock(self, key: str, token: str) -> None:
        """Let go of the lock, if it is still ours (it may have expired and been taken)."""
        await self.run_script(self._unlock, [f"lock:{key}"], [token])

    async def warm(self, wait_s: float = 2.0) -> None:
        """Open the pool's connections (and, on a cluster, learn its slots) at start, so the
        first requests do not spend their short deadline on set-up. A Redis that does not
        answer only costs a log line here: requests will find it, or the circuit, later."""
        from redis.exceptions import RedisError

        client = self._client
        try:
            async with asyncio.timeout(wait_s):
                if self._cluster:
                    await client.initialize()
                    await client.ping()
                else:
                    await asyncio.gather(*(client.ping() for _ in range(self._pool_size)))
        except (TimeoutError, OSError, RedisError) as exc:
            log.warning("redis did not answer at start", extra={"fields": {
                "error": type(exc).__name__}})

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=1.0)
        try:  # a Redis that does not answer the goodbye is not waited for
            async with asyncio.timeout(2.0):
                await self._client.aclose()
                pool = getattr(self._client, "connection_pool", None)
                if pool is not None:
                    await pool.disconnect()
        except TimeoutError:
            log.warning("redis did not close its connections in 2 s")

    async def _call(self, *args: Any) -> Any:
        return await self._guarded(lambda: self._client.execute_command(*args))

    async def _guarded(self, command: Callable[[], Awaitable[Any]]) -> Any:
        if self._open_until > time.monotonic():
            self.skipped += 1
            return None
        try:
            async with asyncio.timeout(self._timeout):
                return await command()
        except Exception as exc:  # noqa: BLE001 - any Redis trouble means: go on uncached
            self.last_error = type(exc).__name__  # the message may name the host
            self._trip(exc)
            return None

    def _trip(self, exc: BaseException) -> None:
        self.failures += 1
        was_open = self._open_until > time.monotonic()
        self._open_until = time.monotonic() + self._circuit_s
        if not was_open:
            reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            log.warning("redis unavailable: serving uncached", extra={"fields": {
                "reason": reason, "retry_in_s": self._circuit_s, "failures": self.failures}})


def _anonymous() -> dict[str, Any]:
    """The arguments that keep a connection from sending CLIENT SETINFO, in this redis-py's
    spelling (driver_info where redis.driver_info exists; lib_name and lib_version before)."""
    if importlib.util.find_spec("redis.driver_info") is not None:
        return {"driver_info": None}
    return {"lib_name": None, "lib_version": None}


def _text(key: bytes | str) -> str:
    return key.decode() if isinstance(key, bytes) else key
