"""A limit on the admin page's login attempts per remote address: each attempt costs a token
verification and a log line, so a script posting the login form in a loop is answered 429
before either. Counts are kept per address in a window of a minute, for a bounded number of
addresses (the least recently seen go first)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from sidecar.errors import RateLimited

WINDOW_S = 60.0
# Addresses remembered at once: a few hundred kilobytes at most.
MAX_ADDRESSES = 4096


@dataclass(slots=True)
class _Window:
    started: float
    attempts: int


class LoginAttempts:
    """At most `per_minute` attempts from one address in a minute."""

    def __init__(self, per_minute: int, max_addresses: int = MAX_ADDRESSES) -> None:
        self._per_minute = per_minute
        self._max = max_addresses
        self._seen: OrderedDict[str, _Window] = OrderedDict()

    def take(self, address: str) -> None:
        """Count an attempt from `address`, or raise RateLimited (it is not counted)."""
        now = time.monotonic()
        window = self._seen.pop(address, None)
        if window is None or now - window.started >= WINDOW_S:
            window = _Window(now, 0)
        self._seen[address] = window  # the most recently seen last
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)
        if window.attempts >= self._per_minute:
            wait = max(1, math.ceil(window.started + WINDOW_S - now))
            raise RateLimited(f"Too many login attempts from this address; try again in "
                              f"{wait} s.", headers={"Retry-After": str(wait)})
        window.attempts += 1
