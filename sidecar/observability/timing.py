"""Where a request's time went: inside the sidecar, or waiting for an upstream."""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.security.jwt import Principal


class Timing:
    __slots__ = ("start", "upstream")

    def __init__(self) -> None:
        self.start = perf_counter()
        self.upstream = 0.0

    def elapsed_ms(self) -> float:
        return (perf_counter() - self.start) * 1000.0

    def overhead_ms(self) -> float:
        """Time spent in the sidecar so far, upstream time excluded."""
        return max(0.0, (perf_counter() - self.start - self.upstream) * 1000.0)


class RequestContext:
    """What the edge knows about a request: its id, its timing, who it acts for (set by the
    guard once a token is verified), and fields for its log line."""

    __slots__ = ("fields", "principal", "request_id", "timing")

    def __init__(self, request_id: str, principal: Principal) -> None:
        self.request_id = request_id
        self.timing = Timing()
        self.principal = principal
        self.fields: dict[str, object] = {}
