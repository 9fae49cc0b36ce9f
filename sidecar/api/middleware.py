"""The edge every request passes: a request id, the OpenAI error envelope, timings and one
structured log line."""

from __future__ import annotations

import asyncio
import logging
import os
import re

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sidecar.api.http import error_response
from sidecar.errors import (
    MethodNotAllowed,
    PayloadTooLarge,
    RouteNotFound,
    SidecarError,
)
from sidecar.keys import LOG_FIELDS, REQUEST_ID, SETTINGS, TIMING
from sidecar.observability.logging import ACCESS
from sidecar.observability.timing import Timing

log = logging.getLogger("sidecar")
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id")
    if given is not None and _CLIENT_ID.fullmatch(given):
        return given
    return "req_" + os.urandom(12).hex()


def make_edge(log_requests: bool) -> Middleware:
    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        timing = Timing()
        rid = _request_id(request)
        request[REQUEST_ID] = rid
        request[TIMING] = timing
        fields: dict[str, object] = {}
        request[LOG_FIELDS] = fields
        response: web.StreamResponse
        try:
            response = await handler(request)
        except SidecarError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            response = error_response(_from_http(request, exc))
        except asyncio.CancelledError:
            _log(request, rid, timing, fields, 499, "client closed the connection")
            raise
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": rid}})
            response = error_response(
                SidecarError(f"The sidecar failed to handle this request (request id {rid}).")
            )
        if not response.prepared:
            headers = response.headers
            headers["X-Request-Id"] = rid
            headers["X-Sidecar-Overhead-Ms"] = f"{timing.overhead_ms():.3f}"
        if log_requests:
            _log(request, rid, timing, fields, response.status, None)
        return response

    return edge


def _log(
    request: web.Request,
    rid: str,
    timing: Timing,
    fields: dict[str, object],
    status: int,
    note: str | None,
) -> None:
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    fields.update(
        request_id=rid,
        method=request.method,
        path=request.path,
        status=status,
        duration_ms=round(timing.elapsed_ms(), 3),
        overhead_ms=round(timing.overhead_ms(), 3),
        upstream_ms=round(timing.upstream * 1000.0, 3),
    )
    if note:
        fields["note"] = note
    ACCESS.info("request", extra={"fields": fields})


def _from_http(request: web.Request, exc: web.HTTPException) -> SidecarError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[SETTINGS].server.max_body_bytes
        return PayloadTooLarge(
            f"The request body is larger than the {limit} bytes this server accepts."
        )
    if isinstance(exc, web.HTTPNotFound):
        return RouteNotFound(f"Unknown request URL: {request.method} {request.path}.")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(
            f"Method {request.method} is not allowed for {request.path}.",
            headers={"Allow": ", ".join(sorted(exc.allowed_methods))},
        )
    error = SidecarError(exc.reason or "HTTP error")
    error.status = exc.status
    error.type = "invalid_request_error" if exc.status < 500 else "server_error"
    return error
