"""Where a request's time went: inside the sidecar, or waiting for an upstream."""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING

from sidecar.observability.record import RequestRecord

if TYPE_CHECKING:
    from sidecar.security.jwt import Principal


class Timing:
    __slots__ = ("model_wait", "start", "upstream")

    def __init__(self) -> None:
        self.start = perf_counter()
        self.upstream = 0.0  # waiting for an upstream's bytes, or a local model's tokens
        self.model_wait = 0.0  # waiting for a local model to load

    def elapsed_ms(self) -> float:
        return (perf_counter() - self.start) * 1000.0

    def overhead_ms(self, now: float | None = None) -> float:
        """Time spent in the sidecar until `now` (by default, so far), upstream time and model
        loading excluded."""
        spent = (perf_counter() if now is None else now) - self.start - self.upstream \
            - self.model_wait
        return max(0.0, spent * 1000.0)


class RequestContext:
    """What the edge knows about a request: its id, its timing, who it acts for (set by the
    guard once a token is verified), the record the path keeps of it, and fields for its log
    line."""

    __slots__ = ("fields", "principal", "record", "request_id", "timing")

    def __init__(self, request_id: str, principal: Principal) -> None:
        self.request_id = request_id
        self.timing = Timing()
        self.principal = principal
        self.record = RequestRecord()
        self.fields: dict[str, object] = {}
