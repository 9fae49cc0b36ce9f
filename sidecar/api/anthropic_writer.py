"""Writing an answer in Anthropic's Messages protocol: a JSON body, or an SSE stream whose
events are named by their type (`event: content_block_delta`), `ping` while the source is
silent, `message_stop` last, and an `error` event (no `message_stop`) when it breaks; errors
in Anthropic's shape (`{"type": "error", "error": {"type", "message"}}`)."""

from __future__ import annotations

import orjson
from aiohttp import web

from sidecar.api.http import JSON, json_bytes
from sidecar.api.sse_writer import SseDialect, write_sse
from sidecar.errors import SidecarError
from sidecar.exchange import Answer

_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_TYPED = b'{"type":"'  # how an event's data starts, as Anthropic and the sidecar write it
# Anthropic's error types by HTTP status (its SDKs pick their exception by the status).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


def error_json(error: SidecarError) -> bytes:
    kind = _ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500
                            else "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": error.message}})


def error_response(error: SidecarError) -> web.Response:
    response = web.Response(body=error_json(error), status=error.status, content_type=JSON)
    for name, value in error.headers.items():
        response.headers[name] = value
    if error.close_connection:
        response.force_close()
    return response


def write_json(request: web.Request, answer: Answer) -> web.Response:
    response = json_bytes(request, answer.body)
    response.headers.extend(answer.headers)
    return response


async def write_stream(request: web.Request, answer: Answer) -> web.StreamResponse:
    return await write_sse(request, answer, MESSAGES_SSE)


def frame(data: bytes) -> bytes:
    """One event, named by its type; a ping for the empty item a silent source yields."""
    if not data:
        return _PING
    if data.startswith(_TYPED):
        end = data.find(b'"', len(_TYPED))
        name = data[len(_TYPED):end] if end > 0 else b"message"
    else:  # written another way round: read it
        try:
            kind = orjson.loads(data).get("type")
        except (orjson.JSONDecodeError, AttributeError):
            kind = None
        name = kind.encode() if isinstance(kind, str) and kind.isidentifier() else b"message"
    return _event(name, data)


def _event(name: bytes, data: bytes) -> bytes:
    return b"event: " + name + b"\ndata: " + data + b"\n\n"


MESSAGES_SSE = SseDialect(frame, lambda error: _event(b"error", error_json(error)), _STOP)
