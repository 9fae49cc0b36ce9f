"""One exception hierarchy; each error knows its HTTP status and its OpenAI error body."""

from __future__ import annotations

from collections.abc import Mapping

import orjson


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


class RateLimited(SidecarError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Unavailable(SidecarError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


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
