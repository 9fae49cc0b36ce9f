"""The in-process tier: an LRU of recent answers with a time to live, and single flight so that
identical misses in flight at once make one upstream call."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from sidecar.cache.records import Record


class MemoryCache:
    def __init__(self, items: int, ttl_s: float) -> None:
        self._items = items
        self._ttl = ttl_s
        self._entries: OrderedDict[str, tuple[float, str, Record]] = OrderedDict()
        # The answer (or the error) of the fetch in flight for a key; None when its caller went
        # away before it finished.
        self._flights: dict[str, asyncio.Future[bytes | BaseException | None]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, tenant: str) -> Record | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, owner, body = entry
        if owner != tenant or expires < time.monotonic():
            # The key already binds the tenant; the stored owner is checked all the same.
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return body

    def drop(self, tenant: str | None = None) -> int:
        """Forget every kept answer, or one tenant's; returns how many were dropped."""
        if tenant is None:
            dropped = len(self._entries)
            self._entries.clear()
            return dropped
        keys = [key for key, (_, owner, _) in self._entries.items() if owner == tenant]
        for key in keys:
            del self._entries[key]
        return len(keys)

    def put(self, key: str, tenant: str, body: Record) -> None:
        self._entries[key] = (time.monotonic() + self._ttl, tenant, body)
        self._entries.move_to_end(key)
        while len(self._entries) > self._items:
            self._entries.popitem(last=False)

    async def single_flight(self, key: str, fetch: Callable[[], Awaitable[bytes]]
                            ) -> tuple[bytes, bool]:
        """The answer for `key`, fetched once however many ask at the same time.
        Returns (answer, True if this caller waited for another's fetch)."""
        while (flight := self._flights.get(key)) is not None:
            shared = await asyncio.shield(flight)
            if isinstance(shared, BaseException):
                # Raised again in many tasks: start its traceback afresh each time.
                raise shared.with_traceback(None)
            if shared is not None:
                return shared, True
            # The caller that was fetching went away: the next in line fetches.
        flight = self._flights[key] = asyncio.get_running_loop().create_future()
        outcome: bytes | BaseException | None = None
        try:
            answer = await fetch()
            outcome = answer
            return answer, False
        except Exception as exc:
            outcome = exc
            raise
        finally:
            del self._flights[key]
            flight.set_result(outcome)
