"""Writing a stream as server-sent events, the same way for every front door: the headers (with
the request id and the sidecar's overhead, which the edge cannot add to a response already
under way), each event as it comes, the protocol's last word, and, when the stream breaks or
the server stops, the protocol's error event instead of that last word: never a silent cut.
A front door brings its dialect: how an event is framed, and what its error and end look like."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, Protocol, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter

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
                if answer.events is None:
                    await response.write(dialect.frame(answer.first))
                else:
                    await write_together(answer.first, answer.events, dialect.frame,
                                         SocketSink(request.writer))
            if dialect.end:
                await response.write(dialect.end)
        except SidecarError as exc:
            # Past the first byte the status is spent: an error event and no last word, so
            # the client knows the answer is incomplete.
            record.stream_error = exc.code or exc.type
            await response.write(dialect.error(exc))
        except ConnectionResetError:
            raise  # the client left: below, not a fault of ours
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


class Sink(Protocol):
    """Where a stream's bytes go: at once, without waiting (`write_now`, True when the socket
    now holds too much), and the wait for the socket that is then due (`settle`)."""

    def write_now(self, chunk: bytes) -> bool: ...

    async def settle(self) -> None: ...


class SocketSink:
    """The response's own writer (aiohttp's, after `prepare`): a write hands the bytes to the
    transport at once, and the socket is waited for past WRITE_TOGETHER bytes, as aiohttp's
    own `write` does."""

    __slots__ = ("_writer",)

    def __init__(self, writer: AbstractStreamWriter) -> None:
        self._writer = cast(StreamWriter, writer)

    def write_now(self, chunk: bytes) -> bool:
        writing = self._writer.write(chunk, drain=False)  # nothing in it waits
        try:
            writing.send(None)
        except StopIteration:
            return self._writer.buffer_size > WRITE_TOGETHER
        writing.close()
        raise RuntimeError("a write without drain waited")

    async def settle(self) -> None:
        self._writer.buffer_size = 0
        await self._writer.drain()


async def write_together(first: bytes, events: AsyncGenerator[bytes, None],
                         frame: Callable[[bytes], bytes], sink: Sink) -> None:
    """Write `first` and the events after it, framed. Events the source gives without waiting
    (a burst read in one piece, a kept answer replayed) go out in one write, up to
    WRITE_TOGETHER bytes; the moment the source has to wait, what it gave is written, so no
    event waits for the next one. Nothing is awaited while the source's step is under way
    but that step itself (its own timeouts act on this task): the writes made then do not
    wait, and the socket is waited for between steps."""
    held = [frame(first)]
    size = len(held[0])
    while True:
        step = events.__anext__()
        try:
            waits_on = step.send(None)
        except StopIteration as ready:  # given without a wait
            held.append(frame(ready.value))
            size += len(held[-1])
            if size >= WRITE_TOGETHER:
                full = sink.write_now(b"".join(held))
                held, size = [], 0
                if full:
                    await sink.settle()
            continue
        except StopAsyncIteration:
            break
        except BaseException:
            if held:  # what came before the failure is the client's
                sink.write_now(b"".join(held))
            raise
        # The source waits: what it gave so far goes out now, then its wait goes on.
        full = False
        if held:
            try:
                full = sink.write_now(b"".join(held))
            except BaseException as exc:
                await _abandon(step, exc)
                raise
            held, size = [], 0
        try:
            data = await _Resumed(step, waits_on)
        except StopAsyncIteration:
            break
        held.append(frame(data))
        size = len(held[0])
        if full:
            await sink.settle()
    if held and sink.write_now(b"".join(held)):
        await sink.settle()


# The most bytes of events held for one write: a burst goes out in pieces of about this size.
WRITE_TOGETHER = 64 * 1024


class _Resumed:
    """The rest of a source's step that was started by hand (`send(None)` gave `waits_on`,
    what it waits for): awaiting this hands that wait to the task, as if awaited from the
    start."""

    __slots__ = ("_step", "_waits_on")

    def __init__(self, step: Coroutine[Any, Any, bytes], waits_on: Any) -> None:
        self._step = step
        self._waits_on = waits_on

    def __await__(self) -> Generator[Any, Any, bytes]:
        step, waits_on = self._step, self._waits_on
        while True:
            try:
                sent = yield waits_on
            except BaseException as exc:  # noqa: BLE001 - cancelled while waiting: the source hears it
                try:
                    waits_on = step.throw(exc)
                except StopIteration as done:
                    return cast(bytes, done.value)
            else:
                try:
                    waits_on = step.send(sent)
                except StopIteration as done:
                    return cast(bytes, done.value)


async def _abandon(step: Coroutine[Any, Any, bytes], exc: BaseException) -> None:
    """End a source's step left waiting, with the exception that ends the stream: the source
    unwinds (closing what it holds, awaiting what its cleanup awaits) before its generator
    is closed."""
    try:
        waits_on = step.throw(exc)
    except BaseException:  # noqa: BLE001 - the stream already ends with `exc`
        return
    with contextlib.suppress(BaseException):
        await _Resumed(step, waits_on)
