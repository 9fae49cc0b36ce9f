"""Writing an answer in OpenAI's protocol: a JSON body, or an SSE stream written event by event
as it comes, `data: [DONE]` last, and an error event (no `[DONE]`) when it breaks."""

from __future__ import annotations

from aiohttp import web

from sidecar.api.http import json_bytes
from sidecar.api.sse_writer import SseDialect, write_sse
from sidecar.errors import SidecarError
from sidecar.exchange import Answer
from sidecar.protocol.sse import DONE_FRAME, frame
from sidecar.protocol.sse import HEARTBEAT as HEARTBEAT_FRAME


def write_json(request: web.Request, answer: Answer) -> web.Response:
    response = json_bytes(request, answer.body)
    response.headers.extend(answer.headers)
    return response


async def write_stream(request: web.Request, answer: Answer) -> web.StreamResponse:
    return await write_sse(request, answer, OPENAI_SSE)


def _frame(data: bytes) -> bytes:
    """An event, or a heartbeat comment for the empty item a silent source yields."""
    return frame(data) if data else HEARTBEAT_FRAME


def _error(error: SidecarError) -> bytes:
    return frame(error.to_json())


OPENAI_SSE = SseDialect(_frame, _error, DONE_FRAME)
