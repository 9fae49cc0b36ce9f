"""Single-use WebSocket tickets for browsers, which cannot set an `Authorization` header on a
WebSocket: a client holding a token trades it for a ticket that opens one socket as the same
principal, within a short time, once."""

from __future__ import annotations

import secrets
import time

from sidecar.errors import Unavailable
from sidecar.security.jwt import Principal, Unauthorized

# Tickets waiting to be used at most; beyond it new ones are refused until some are used or
# expire (a client cannot grow the table without bound).
MAX_OUTSTANDING = 10_000


class TicketBook:
    """The tickets issued and not yet used nor expired. Every ticket lives as long, so the
    table's insertion order is expiry order: the expired ones are dropped from its front."""

    def __init__(self, ttl_s: float, capacity: int = MAX_OUTSTANDING) -> None:
        self.ttl_s = ttl_s
        self._capacity = capacity
        self._tickets: dict[str, tuple[Principal, float]] = {}

    def __len__(self) -> int:
        return len(self._tickets)

    def issue(self, principal: Principal) -> tuple[str, float]:
        """A new ticket and the wall-clock time it expires at."""
        now = time.monotonic()
        self._forget_expired(now)
        if len(self._tickets) >= self._capacity:
            raise Unavailable("Too many WebSocket tickets wait to be used; try again shortly.",
                              code="too_many_tickets", headers={"Retry-After": "1"})
        ticket = secrets.token_urlsafe(24)
        self._tickets[ticket] = (principal, now + self.ttl_s)
        return ticket, time.time() + self.ttl_s

    def redeem(self, ticket: str) -> Principal:
        """The ticket's principal; the ticket is spent whatever the outcome."""
        held = self._tickets.pop(ticket, None)
        if held is None:
            raise Unauthorized("The WebSocket ticket is unknown or was already used.",
                               code="invalid_ticket")
        principal, expires = held
        if time.monotonic() > expires:
            raise Unauthorized("The WebSocket ticket has expired.", code="invalid_ticket")
        return principal

    def _forget_expired(self, now: float) -> None:
        tickets = self._tickets
        while tickets:
            oldest = next(iter(tickets))
            if tickets[oldest][1] >= now:
                break
            del tickets[oldest]
