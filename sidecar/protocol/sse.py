"""Server-sent events: splitting an upstream byte stream into events, and framing ours."""

from __future__ import annotations

DONE = b"[DONE]"
HEARTBEAT = b": keep-alive\n\n"
# One event's bytes at most, unless the caller says otherwise (an upstream's setting).
MAX_EVENT_BYTES = 4 * 1024 * 1024


def frame(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


DONE_FRAME = frame(DONE)


class EventTooLarge(ValueError):
    """One event grew past the splitter's limit. `events` are those that completed before it
    in the same chunk: the caller may still pass them on."""

    def __init__(self, message: str, events: list[bytes]) -> None:
        super().__init__(message)
        self.events = events


class EventSplitter:
    """Feeds on arbitrary byte chunks and returns each complete event's `data` as it completes.

    Comment lines and fields other than `data` are dropped (OpenAI streams use neither); an
    event's several `data:` lines are joined with a newline, as the SSE spec says. Each byte is
    searched once, so a source that never ends its event costs time in proportion to what it
    sent, and raises `EventTooLarge` once the unfinished event holds over `max_event_bytes`.
    """

    __slots__ = ("_buffer", "_cr", "_limit")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()  # the unfinished event, line endings already LF
        self._cr = False  # the last chunk ended in a CR: a LF starting the next one is its pair
        self._limit = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        if not chunk:
            return []
        if self._cr and chunk[0] == 10:  # "\n": the second half of a CRLF already counted
            chunk = chunk[1:]
        self._cr = False
        if b"\r" in chunk:
            self._cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._buffer
        source: bytes | bytearray
        if buffer:
            # Only the last held byte can pair with the new ones into the "\n\n" separator:
            # what was searched before is not searched (or copied) again.
            search = len(buffer) - 1
            buffer += chunk
            source = buffer
        else:
            search = 0
            source = chunk  # the common case: whole events, nothing held
        limit = self._limit
        events: list[bytes] = []
        start = 0
        while (end := source.find(b"\n\n", search)) >= 0:
            if end - start > limit:
                raise EventTooLarge(f"an event of {end - start} bytes", events)
            data = _event_data(bytes(source[start:end]))
            if data is not None:
                events.append(data)
            start = search = end + 2
        if source is chunk:
            if start < len(chunk):
                buffer += chunk[start:] if start else chunk
        elif start:
            del buffer[:start]
        if len(buffer) > limit:
            raise EventTooLarge(f"an unfinished event of over {len(buffer)} bytes", events)
        return events

    @property
    def pending(self) -> bool:
        """True when bytes of an unfinished event are held."""
        return bool(self._buffer.strip())


def _event_data(block: bytes) -> bytes | None:
    if block.startswith(b"data:") and b"\n" not in block:
        # The common case: one `data:` line per event.
        return block[6:] if block[5:6] == b" " else block[5:]
    lines = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines) if lines else None
