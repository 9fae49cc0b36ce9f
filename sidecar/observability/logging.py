"""Structured logs: one JSON object per line on stderr, for journald and log shippers.

Lines are formatted where they happen and written by one thread, so the event loop never waits
on a slow pipe, and a busy second costs one write per batch rather than one per request.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections import deque
from typing import Any, TextIO

import orjson

log = logging.getLogger("sidecar")


class LineWriter:
    """Owns the output stream; anything may queue a line, one thread writes them."""

    def __init__(self, stream: TextIO, interval_s: float = 0.05,
                 max_pending: int = 100_000) -> None:
        self._stream = stream
        self._lines: deque[str] = deque()
        # A reader that stops reading (journald stalled) must not grow memory without bound:
        # past this many waiting lines, new ones are counted and dropped.
        self._max_pending = max_pending
        self.dropped = 0
        self._wake = threading.Event()
        self._stop = False
        self._interval = interval_s
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def put(self, line: str) -> None:
        if len(self._lines) < self._max_pending:
            self._lines.append(line)
        else:
            self.dropped += 1

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(5)
        self._drain()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self._interval)
            self._drain()

    def _drain(self) -> None:
        lines = self._lines
        if not lines:
            return
        batch = []
        while lines:
            batch.append(lines.popleft())
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            batch.append(orjson.dumps({"ts": _timestamp(time.time()), "level": "warning",
                                       "logger": "sidecar", "msg": "log lines dropped",
                                       "count": dropped}).decode())
        try:
            self._stream.write("\n".join(batch) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stderr gone: nowhere left to say so


@functools.lru_cache(maxsize=4)
def _second(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def _timestamp(created: float) -> str:
    """ISO 8601 in UTC with milliseconds."""
    whole = int(created)
    return f"{_second(whole)}.{int((created - whole) * 1000):03d}Z"


class JsonHandler(logging.Handler):
    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = logging.Formatter().formatException(record.exc_info)
        self._writer.put(orjson.dumps(entry, default=str).decode())


class AccessLog:
    """One line per request, without the cost of a LogRecord on the hot path."""

    def __init__(self, writer: LineWriter | None) -> None:
        self._writer = writer
        self._second = -1
        self._second_text = ""

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def write(self, fields: dict[str, object]) -> None:
        if self._writer is None:
            return
        now = time.time()
        whole = int(now)
        if whole != self._second:
            self._second, self._second_text = whole, _second(whole)
        fields["ts"] = f"{self._second_text}.{int((now - whole) * 1000):03d}Z"
        fields["level"] = "info"
        fields["logger"] = "sidecar.access"
        self._writer.put(orjson.dumps(fields, default=str).decode())


def configure(level: str, stream: TextIO | None = None) -> LineWriter:
    writer = LineWriter(stream or sys.stderr)
    root = logging.getLogger()
    root.handlers[:] = [JsonHandler(writer)]
    root.setLevel(level.upper())
    # aiohttp's own access log is off; ours carries the request id and timings.
    logging.getLogger("aiohttp.access").disabled = True
    return writer


def process_tag() -> str:
    """A short random tag that makes ids from this process unique across a fleet."""
    return os.urandom(6).hex()
