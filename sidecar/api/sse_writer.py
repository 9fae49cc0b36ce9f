"""Writing a stream as server-sent events, the same way for every front door: the headers (with
the request id and the sidecar's overhead, which the edge cannot add to a response already
under way), each event as it comes, the protocol's last word, and, when the stream breaks or
the server stops, the protocol's error event instead of that last word: never a silent cut.
A front door brings its dialect: how an event is framed, and what its error and end look like."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from sidecar.appkeys import CONTEXT
from sidecar.errors import SHUTTING_DOWN, ShuttingDown, SidecarError, cancelled_for_shutdown
from sidecar.exchange import Answer

log = logging.getLogger("sidecar")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@dataclass(frozen=True, slots=True)
class SseDialect:
    # An event's data → its bytes; b"" (what a silent source yields) → a heartbeat.
    frame: Callable[[bytes], bytes]
    error: Callable[[SidecarError], bytes]  # the event that says the stream broke
    end: bytes = b""  # after the last event (OpenAI's [DONE], Anthropic's message_stop)


async def write_sse(request: web.Request, answer: Answer, dialect: SseDialect
                    ) -> web.StreamResponse:
    context = request[CONTEXT]
    record = context.record
    record.stream = True
    response: web.StreamResponse | None = None
    try:
        response = web.StreamResponse(headers=SSE_HEADERS)
        response.headers.update(answer.headers)
        response.headers["X-Request-Id"] = context.request_id
        response.headers["X-Sidecar-Overhead-Ms"] = f"{context.timing.overhead_ms():.3f}"
        await response.prepare(request)
        try:
            if answer.first is not None:
                frame, write = dialect.frame, response.write
                await write(frame(answer.first))
                if answer.events is not None:
                    async for data in answer.events:
                        await write(frame(data))
            if dialect.end:
                await response.write(dialect.end)
        except SidecarError as exc:
            # Past the first byte the status is spent: an error event and no last word, so
            # the client knows the answer is incomplete.
            record.stream_error = exc.code or exc.type
            await response.write(dialect.error(exc))
        except Exception:
            # A fault of ours mid-stream: the same error event, never a second response
            # written into the body of the first.
            log.exception("stream failed", extra={"fields": {
                "request_id": context.request_id}})
            record.stream_error = SidecarError.type
            await response.write(dialect.error(SidecarError(
                f"The sidecar failed to handle this stream (request id "
                f"{context.request_id}).")))
        await response.write_eof()
        return response
    except ConnectionResetError:
        # The client went away between two events: the source is closed below, and what is
        # returned goes nowhere; the log line carries stream_error = client_gone.
        record.stream_error = "client_gone"
        return response if response is not None else web.Response(status=499)
    except asyncio.CancelledError as exc:
        if response is not None and response.prepared and cancelled_for_shutdown(exc):
            # The server stops and the drain's time is up: say so in the stream.
            record.stream_error = SHUTTING_DOWN
            with contextlib.suppress(ConnectionError):
                await response.write(dialect.error(ShuttingDown("The server is shutting down.")))
                await response.write_eof()
        raise
    finally:
        await answer.close()
