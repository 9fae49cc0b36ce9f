"""What the admin page draws from the metrics' windows, without I/O: the sparkline's points."""

from __future__ import annotations

from sidecar.api.admin_views import SPARK_HEIGHT, SPARK_WIDTH, sparklines
from sidecar.observability.windows import ROW, SLOTS


def row(stamp: int, requests: int) -> list[int]:
    return [stamp, requests, *([0] * (ROW - 1))]


def points(line: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in (p.split(",") for p in line.split())]


def test_a_sparkline_has_a_point_per_slot_oldest_left_and_the_busiest_slot_on_top() -> None:
    now = 1000
    drawn = sparklines((now, {("m", "p/t"): [row(now, 4), row(now - 10, 2),
                                             row(now - SLOTS, 99)]}))
    line = points(drawn[("m", "p/t")])
    assert len(line) == SLOTS
    assert line[0][0] == 0 and line[-1][0] == SPARK_WIDTH
    # The newest slot (4 requests) is the tallest: the top of the box; a slot as old as the
    # window is outside it and not drawn.
    assert line[-1][1] == 1.0
    assert line[-11][1] == SPARK_HEIGHT - 1 - (SPARK_HEIGHT - 2) / 2
    assert all(y == SPARK_HEIGHT - 1 for _, y in line[:-11])


def test_no_traffic_draws_a_flat_line() -> None:
    line = points(sparklines((50, {("m", "p/t"): [row(50, 0)]}))[("m", "p/t")])
    assert {y for _, y in line} == {SPARK_HEIGHT - 1}
