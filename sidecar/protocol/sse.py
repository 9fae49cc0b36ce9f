"""Server-sent events: splitting an upstream byte stream into events, and framing ours."""

from __future__ import annotations

DONE = b"[DONE]"
HEARTBEAT = b": keep-alive\n\n"


def frame(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


DONE_FRAME = frame(DONE)


class EventSplitter:
    """Feeds on arbitrary byte chunks and returns each complete event's `data` as it completes.

    Comment lines and fields other than `data` are dropped (OpenAI streams use neither); an
    event's several `data:` lines are joined with a newline, as the SSE spec says.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            # A lone CR at the end may be the first half of a CRLF still on its way.
            keep_cr = buffer.endswith(b"\r")
            buffer = buffer.replace(b"\r\n", b"\n")
            if keep_cr:
                buffer = buffer[:-1]
            buffer = buffer.replace(b"\r", b"\n")
            if keep_cr:
                buffer += b"\r"
        events: list[bytes] = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            data = _event_data(buffer[start:end])
            if data is not None:
                events.append(data)
            start = end + 2
        self._buffer = buffer[start:]
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
