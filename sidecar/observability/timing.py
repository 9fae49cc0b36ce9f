"""Where a request's time went: inside the sidecar, or waiting for an upstream."""

from __future__ import annotations

from time import perf_counter


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
