"""The rolling windows behind GET /admin/api/stats: per model and target, the requests,
errors and latencies of the last five minutes in 5-second slots, kept on the event loop and
copied for the page."""

from __future__ import annotations

from bisect import bisect_left
from time import perf_counter

# The boundaries of the request duration histogram (OpenTelemetry's recommended ones, which
# go on past 82 s here, because a slow local CPU model can take minutes over one answer).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92, 163.84, 327.68, 655.36)
# The rolling windows of /admin/api/stats: 5-second slots over the last five minutes, and
# latency buckets at most 25% apart from 1 ms to 5 hours (a percentile is known to within
# that). They include the duration histogram's boundaries, so that one look-up places a
# request in both: the histogram is summed from these buckets when it is read.
SLOT_S = 5
SLOTS = 60
WINDOWS = {"1m": 12, "5m": 60}
LATENCY_BOUNDS = tuple(sorted({*(0.001 * 1.25 ** i for i in range(76)), *DURATION_BUCKETS}))
# For each latency bucket (and +Inf), the duration histogram's bucket it falls in.
DURATION_OF = (*(bisect_left(DURATION_BUCKETS, bound) for bound in LATENCY_BOUNDS),
               len(DURATION_BUCKETS))
ROW = len(LATENCY_BOUNDS) + 3  # requests, errors, then a count per latency bucket and +Inf


class Windows:
    """Per model and target: requests, errors and latencies in the last slots. A target that
    failed before another answered counts a request and an error, without a latency."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], tuple[list[int], list[list[int]]]] = {}

    def series_of(self, model: str, target: str) -> tuple[list[int], list[list[int]]]:
        """The slots of one model and target: each slot's number, and its row."""
        series = self.series.get((model, target))
        if series is None:
            series = self.series[(model, target)] = ([-1] * SLOTS, [[] for _ in range(SLOTS)])
        return series

    def row(self, model: str, target: str, slot: int) -> list[int]:
        stamps, rows = self.series_of(model, target)
        i = slot % SLOTS
        if stamps[i] != slot:
            stamps[i] = slot
            rows[i] = [0] * ROW
        return rows[i]

    def copy(self) -> tuple[int, dict[tuple[str, str], list[list[int]]]]:
        """The slots still inside the longest window, copied on the loop."""
        now = int(perf_counter() // SLOT_S)  # the clock of the requests' timings
        return now, {key: [[stamp, *row] for stamp, row in zip(*series, strict=True)
                           if now - SLOTS < stamp <= now]
                     for key, series in self.series.items()}
