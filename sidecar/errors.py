"""One exception hierarchy; each error knows its HTTP status and its OpenAI error body."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import orjson

# The reason a stopping server gives when it ends a request still running after the drain
# (asyncio's cancel message): a handler tells it from a client that went away.
SHUTTING_DOWN = "server_shutting_down"


class SidecarError(Exception):
    """An error a client is allowed to see, in the OpenAI error shape."""

    status = 500
    type = "server_error"
    code: str | None = None
    # Close the connection after answering (the rest of the request cannot be trusted).
    close_connection = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, object]:
        return error_body(self.message, self.type, self.param, self.code)

    def to_json(self) -> bytes:
        return orjson.dumps(self.body())


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class InvalidRequest(SidecarError):
    status = 400
    type = "invalid_request_error"


class ForbiddenField(InvalidRequest):
    code = "forbidden_field"


class ModelNotFound(SidecarError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RouteNotFound(SidecarError):
    status = 404
    type = "invalid_request_error"
    code = "unknown_url"


class MethodNotAllowed(SidecarError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(SidecarError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    close_connection = True


class PayloadTooLarge(SidecarError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(SidecarError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class BrowserRefused(SidecarError):
    """A request a browser was led to make: another site's Origin, or a Host that is not
    this server (DNS rebinding)."""

    status = 403
    type = "permission_error"
    code = "origin_not_allowed"


class RateLimited(SidecarError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Unavailable(SidecarError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class ShuttingDown(Unavailable):
    code = SHUTTING_DOWN


def cancelled_for_shutdown(exc: BaseException) -> bool:
    """The request was ended by the drain of a stopping server, not by its client leaving."""
    return isinstance(exc, asyncio.CancelledError) and SHUTTING_DOWN in exc.args


class Spillable(Unavailable):
    """A target that cannot take the request now (a full queue, a model not loaded): the
    request goes to another target, if the route has one, at no cost to the retry budget."""


class UpstreamError(SidecarError):
    """The upstream answered with something we cannot pass on as a success."""

    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout"
    code = "upstream_timeout"


class UpstreamStatus(SidecarError):
    """An upstream 4xx (or 429) passed through with its status and, when it has one, its error."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, headers=headers)
        self.status = status
        self.type = type_
