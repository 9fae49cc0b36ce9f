"""Log lines: JSON, written by a thread, bounded when nobody reads them."""

from __future__ import annotations

import io
import logging

import orjson

from sidecar.observability.logging import AccessLog, JsonHandler, LineWriter


def test_lines_are_json_and_carry_their_fields() -> None:
    out = io.StringIO()
    writer = LineWriter(out)
    logger = logging.getLogger("test.json")
    logger.addHandler(JsonHandler(writer))
    logger.propagate = False
    logger.warning("upstream slow", extra={"fields": {"provider": "p", "ms": 12}})
    AccessLog(writer).write({"request_id": "r1", "status": 200})
    writer.close()
    first, second = (orjson.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "upstream slow" and first["provider"] == "p" and first["ms"] == 12
    assert first["level"] == "warning" and first["ts"].endswith("Z")
    assert second["logger"] == "sidecar.access" and second["status"] == 200


def test_a_reader_that_stops_costs_bounded_memory_and_is_told() -> None:
    out = io.StringIO()
    writer = LineWriter(out, interval_s=3600, max_pending=10)
    for i in range(25):
        writer.put(f'{{"n":{i}}}')
    assert writer.dropped == 15
    writer.close()
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line["n"] for line in lines[:10]] == list(range(10))
    assert lines[-1]["msg"] == "log lines dropped" and lines[-1]["count"] == 15
