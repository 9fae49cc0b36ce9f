"""Writing an answer in OpenAI's protocol: a JSON body, or an SSE stream written event by event
as it comes, `data: [DONE]` last, and an error event (no `[DONE]`) when it breaks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from sidecar.api.http import json_bytes
from sidecar.appkeys import CONTEXT
from sidecar.errors import SHUTTING_DOWN, ShuttingDown, SidecarError, cancelled_for_shutdown
from sidecar.exchange import Answer
from sidecar.protocol.sse import DONE_FRAME, frame
from sidecar.protocol.sse import HEARTBEAT as HEARTBEAT_FRAME

_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def write_json(request: web.Request, answer: Answer) -> web.Response:
    response = json_bytes(request, answer.body)
    response.headers.extend(answer.headers)
    return response


async def write_stream(request: web.Request, answer: Answer) -> web.StreamResponse:
    context = request[CONTEXT]
    record = context.record
    record.stream = True
    response: web.StreamResponse | None = None
    try:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        response.headers.update(answer.headers)
        response.headers["X-Request-Id"] = context.request_id
        response.headers["X-Sidecar-Overhead-Ms"] = f"{context.timing.overhead_ms():.3f}"
        await response.prepare(request)
        try:
            if answer.first is not None:
                await response.write(_frame(answer.first))
                if answer.events is not None:
                    await _pump(response, answer.events)
            await response.write(DONE_FRAME)
        except SidecarError as exc:
            # Past the first byte the status is spent: say what happened in the stream and
            # end it without [DONE], so the client knows the answer is incomplete.
            record.stream_error = exc.code or exc.type
            await response.write(frame(exc.to_json()))
        await response.write_eof()
        return response
    except ConnectionResetError:
        # The client went away between two events: the source is closed below, and what is
        # returned goes nowhere; the log line carries stream_error = client_gone.
        record.stream_error = "client_gone"
        return response if response is not None else web.Response(status=499)
    except asyncio.CancelledError as exc:
        if response is not None and response.prepared and cancelled_for_shutdown(exc):
            # The server stops and the drain's time is up: say so in the stream, without
            # [DONE], rather than cutting it silently.
            record.stream_error = SHUTTING_DOWN
            with contextlib.suppress(ConnectionError):
                await response.write(frame(ShuttingDown("The server is shutting down.").to_json()))
                await response.write_eof()
        raise
    finally:
        await answer.close()


def _frame(data: bytes) -> bytes:
    """An event, or a heartbeat comment for the empty item a silent source yields."""
    return frame(data) if data else HEARTBEAT_FRAME


async def _pump(response: web.StreamResponse, events: AsyncIterator[bytes]) -> None:
    write = response.write
    async for data in events:
        await write(_frame(data))
