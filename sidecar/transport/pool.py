"""Keep-alive connections to one upstream: at most `limit` open at once (0: no cap; requests
past it wait their turn in order), idle ones closed after `idle_s`, and only connections whose
last response was read to its end, with keep-alive allowed, are ever handed out again."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from sidecar.transport.connection import Connection


class Pool:
    def __init__(self, dial: Callable[[], Awaitable[Connection]], limit: int,
                 idle_s: float) -> None:
        self._dial = dial
        self._limit = limit
        self._idle_s = idle_s
        # Most recently released last: the warmest connection is taken first, the oldest
        # ones age out.
        self._idle: deque[tuple[Connection, float]] = deque()
        self._open = 0
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def open(self) -> int:
        """Connections open now, in use or idle."""
        return self._open

    @property
    def idle(self) -> int:
        return len(self._idle)

    def take(self) -> Connection | None:
        """A live idle connection, if there is one (the common case, without awaiting)."""
        while self._idle:
            connection, _ = self._idle.pop()
            if connection.closed or not connection.idle:
                self._open -= 1  # closed by the peer while idle
                continue
            connection.reused = True
            return connection
        return None

    async def acquire(self) -> Connection:
        """A live idle connection, or a new one (which may raise the dial's errors)."""
        connection = self.take()
        if connection is not None:
            return connection
        if self._limit and self._open >= self._limit:
            waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._give_back(waiter.result())
                raise
            if handed is not None:
                handed.reused = True
                return handed
            # A slot was freed for us: it is already counted below.
        else:
            self._open += 1
        try:
            return await self._dial()
        except BaseException:
            self._open -= 1
            self._next_waiter()
            raise

    def release(self, connection: Connection) -> None:
        """A connection whose request is over: kept if reusable, else closed."""
        if not connection.reusable or self._closed:
            self.discard(connection)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        loop = asyncio.get_running_loop()
        self._idle.append((connection, loop.time()))
        if self._sweep is None:
            self._sweep = loop.call_later(self._idle_s, self._expire)

    def discard(self, connection: Connection) -> None:
        """A connection that must never serve another request: closed at once."""
        connection.abort()
        self._open -= 1
        self._next_waiter()

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._idle:
            connection, _ = self._idle.pop()
            connection.abort()
            self._open -= 1
        for waiter in self._waiters:
            waiter.cancel()
        self._waiters.clear()

    def _give_back(self, connection: Connection | None) -> None:
        if connection is None:  # a slot handed to a waiter that left
            self._open -= 1
            self._next_waiter()
        else:
            self.release(connection)

    def _next_waiter(self) -> None:
        """A slot came free: the first waiter still waiting dials a connection of its own."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._open += 1
                waiter.set_result(None)
                return

    def _expire(self) -> None:
        self._sweep = None
        loop = asyncio.get_running_loop()
        oldest = loop.time() - self._idle_s
        idle = self._idle
        while idle and (idle[0][1] <= oldest or idle[0][0].closed):
            connection, _ = idle.popleft()
            connection.abort()
            self._open -= 1
        if idle:
            self._sweep = loop.call_later(idle[0][1] + self._idle_s - loop.time() + 0.01,
                                          self._expire)
