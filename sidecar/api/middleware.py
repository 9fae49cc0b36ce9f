"""The edge every request passes: a request id, the OpenAI error envelope, timings and one
structured log line; with auth off, the refusal of what a browser was led to send."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import re
from time import perf_counter

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from sidecar.api.anthropic import speaks_anthropic
from sidecar.api.anthropic_writer import error_response as anthropic_error_response
from sidecar.api.http import error_response
from sidecar.api.sockets import admits_itself
from sidecar.appkeys import CONTEXT, SETTINGS
from sidecar.errors import (
    BrowserRefused,
    MethodNotAllowed,
    PayloadTooLarge,
    RouteNotFound,
    ShuttingDown,
    SidecarError,
    UnsupportedMediaType,
    cancelled_for_shutdown,
)
from sidecar.observability.logging import AccessLog, process_tag
from sidecar.observability.metrics import Metrics
from sidecar.observability.timing import RequestContext
from sidecar.security.jwt import ANONYMOUS, Forbidden, Unauthorized, Verifier, bearer
from sidecar.security.limits import Limiter
from sidecar.settings import AuthSettings, Settings

log = logging.getLogger("sidecar")
_AUTH_REFUSALS = (Unauthorized, Forbidden, BrowserRefused)
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def make_middleware(access_log: AccessLog, guard: Guard, metrics: Metrics | None = None
                    ) -> Middleware:
    # Ids are a per-process random tag and a counter: unique across a fleet, and cheap.
    prefix = f"req_{process_tag()}"
    counter = itertools.count(1)

    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("X-Request-Id")
        if given is not None and _CLIENT_ID.fullmatch(given):
            rid = given
        else:
            rid = f"{prefix}{next(counter):08x}"
        context = RequestContext(rid, ANONYMOUS)
        request[CONTEXT] = context
        timing = context.timing
        fields = context.fields
        response: web.StreamResponse
        failure: SidecarError | None = None  # for the metrics: a refusal's kind
        try:
            if guard.applies(request.path) and not admits_itself(request):
                await guard.admit(request, context)
                try:
                    response = await handler(request)
                finally:
                    guard.release()
            else:
                response = await handler(request)
        except SidecarError as exc:
            failure = exc
            if isinstance(exc, _AUTH_REFUSALS):
                fields["auth_error"] = exc.code or exc.type  # the reason, never the token
            response = _error_response(request, exc)
        except web.HTTPException as exc:
            response = _error_response(request, _from_http(request, exc))
        except asyncio.CancelledError as exc:
            if not cancelled_for_shutdown(exc):
                now = perf_counter()
                _log(access_log, request, context, 499, "client closed the connection", now)
                if metrics is not None:
                    metrics.observe(request.path, context, 499, None, now)
                raise
            if request.writer.output_size > 0:  # a stream under way ends in its own way
                now = perf_counter()
                _log(access_log, request, context, 503, "server shutting down", now)
                if metrics is not None:
                    metrics.observe(request.path, context, 503, None, now)
                raise
            # Nothing was sent yet: the client gets a 503 it may retry elsewhere.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            response = _error_response(request, ShuttingDown(
                "The server is shutting down; retry the request.", headers={"Retry-After": "1"}))
            response.force_close()
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": rid}})
            if request.writer is not None and request.writer.output_size > 0:
                # A response is under way: another written after it would corrupt it. The
                # request still has its line and its count.
                now = perf_counter()
                _log(access_log, request, context, 500, "failed after its response began",
                     now)
                if metrics is not None:
                    metrics.observe(request.path, context, 500, None, now)
                raise
            response = _error_response(request, SidecarError(
                f"The sidecar failed to handle this request (request id {rid})."))
        now = perf_counter()  # one reading for the header, the log line and the metrics
        overhead_ms = timing.overhead_ms(now)
        if not response.prepared:
            headers = response.headers
            headers["X-Request-Id"] = rid
            headers["X-Sidecar-Overhead-Ms"] = f"{overhead_ms:.3f}"
        if access_log.enabled:
            fields["overhead_us"] = int(overhead_ms * 1000)
            _log(access_log, request, context, response.status, None, now)
        if metrics is not None:
            metrics.observe(request.path, context, response.status, failure, now)
        return response

    return edge


class Guard:
    """Who may do what, and how much: the token (when auth is on) decides the tenant and its
    scopes; then the process-wide cap and the tenant's request budget. Called by the edge
    middleware around the handler rather than as a middleware of its own: one layer less on
    every request."""

    def __init__(self, verifier: Verifier | None, auth: AuthSettings, limiter: Limiter) -> None:
        self._verifier = verifier
        self._chat_scope = auth.chat_scope
        self._admin_scope = auth.admin_scope
        self._limiter = limiter
        self._requests = limiter.requests
        self._browsers: BrowserCheck | None = None

    @staticmethod
    def applies(path: str) -> bool:
        # The admin page under /admin/ checks its own session (sidecar/api/admin_page_access.py):
        # a browser holds a cookie there, never a token.
        return path.startswith(("/v1/", "/admin/api/")) or path == "/admin/api"

    async def admit(self, request: web.Request, context: RequestContext) -> None:
        """Raise the refusal, or count the request in (then `release` must follow)."""
        if self._verifier is None:
            # No token to prove intent: a page in the user's browser could otherwise drive
            # the API (and the admin API) of a sidecar on this machine.
            if self._browsers is None:
                self._browsers = BrowserCheck(request.app[SETTINGS])
            self._browsers.check(request)
        else:
            needed = self._chat_scope if request.path.startswith("/v1/") else self._admin_scope
            principal = await self._verifier.verify(_bearer(request))
            if needed not in principal.scopes:
                raise Forbidden(f"The token lacks the `{needed}` scope this request needs.")
            context.principal = principal
            context.fields["tenant"] = principal.tenant
        limiter = self._limiter
        limiter.enter()
        if self._requests is not None:
            try:
                shared = limiter.shared_requests
                if shared is None:
                    self._requests.take(context.principal.tenant, 1)
                else:
                    await shared.take(context.principal.tenant, 1)
            except BaseException:
                limiter.leave()
                raise

    def release(self) -> None:
        self._limiter.leave()


class BrowserCheck:
    """What only a browser led by another site sends: an Origin that is not this server's,
    a Host that is not one of its names (DNS rebinding), or a body that is not declared JSON
    (the kinds a page may send without asking first). SDKs and curl send none of these."""

    def __init__(self, settings: Settings) -> None:
        server = settings.server
        self._names = frozenset(
            _host_name(h) for h in (server.host, *settings.listen_addresses, "localhost",
                                    *server.allowed_hosts) if h)
        # Listening on every address: any address of this machine is its own.
        addresses = [_ip(a) for a in settings.listen_addresses]
        self._any_address = any(a is not None and a.is_unspecified for a in addresses)
        self._seen: set[str] = set()  # Host headers already found to name this server

    def check(self, request: web.Request) -> None:
        self.check_origin(request)
        headers = request.headers
        if request.method in _WITH_BODY and request.body_exists:
            # The usual header, as clients write it, needs no parsing.
            if headers.get(hdrs.CONTENT_TYPE) in _PLAIN_JSON:
                return
            kind = request.content_type
            if kind != "application/json" and not kind.endswith("+json"):
                raise UnsupportedMediaType(
                    "The body must be JSON, sent with `Content-Type: application/json`.")

    def check_origin(self, request: web.Request) -> None:
        """The Host is one of this server's names and the Origin, when sent, is this server."""
        self.check_host(request)
        headers = request.headers
        host = headers.get(hdrs.HOST)
        origin = headers.get(hdrs.ORIGIN)
        if origin is not None and origin.lower() != f"{request.scheme}://{host}".lower():
            raise BrowserRefused(f"Requests from the origin `{origin[:100]}` are not accepted.")

    def check_host(self, request: web.Request) -> None:
        """The Host is one of this server's names (not a rebound DNS name)."""
        host = request.headers.get(hdrs.HOST)
        if host is not None and host not in self._seen and not self._known_host(host):
            raise BrowserRefused(f"The Host `{host[:100]}` is not a name of this server; add it "
                                 "to server.allowed_hosts if it is.", code="host_not_allowed")

    def _known_host(self, host: str) -> bool:
        """A Host header's verdict; the accepted ones are remembered (a few, bounded)."""
        if not self._known(_host_name(host)):
            return False
        if len(self._seen) < 64:
            self._seen.add(host)
        return True

    def _known(self, name: str) -> bool:
        if name in self._names:
            return True
        address = _ip(name)
        return address is not None and (address.is_loopback or self._any_address)


_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
_PLAIN_JSON = frozenset({"application/json", "application/json; charset=utf-8",
                         "application/json; charset=UTF-8"})


def _host_name(host: str) -> str:
    """The name in a Host header (or an address), without port, brackets or final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name.partition("%")[0])
    except ValueError:
        return None


def _error_response(request: web.Request, error: SidecarError) -> web.Response:
    """The error in the shape of the protocol the request was made in."""
    if speaks_anthropic(request.path):
        return anthropic_error_response(error)
    return error_response(error)


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization")
    if header is None and speaks_anthropic(request.path):
        # Anthropic's clients send their key as `x-api-key`: here, the sidecar's token.
        key = request.headers.get("x-api-key", "").strip()
        if key:
            return key
        raise Unauthorized("This request needs the sidecar's token as `x-api-key` or in an "
                           "`Authorization: Bearer <token>` header.", code="missing_token")
    return bearer(header, "This request needs an `Authorization: Bearer <token>` header.")


def _log(access_log: AccessLog, request: web.Request, context: RequestContext, status: int,
         note: str | None, now: float) -> None:
    """The request's one log line: the edge's fields, and what the path recorded."""
    if not access_log.enabled:
        return
    fields, timing = context.fields, context.timing
    context.record.log_fields(fields)
    if timing.model_wait:
        fields["model_wait_us"] = int(timing.model_wait * 1_000_000)
    fields.setdefault("overhead_us", int(timing.overhead_ms(now) * 1000))
    fields["request_id"] = context.request_id
    fields["method"] = request.method
    fields["path"] = request.path
    fields["status"] = status
    fields["duration_us"] = int((now - timing.start) * 1_000_000)
    fields["upstream_us"] = int(timing.upstream * 1e6)
    if note:
        fields["note"] = note
    access_log.write(fields)


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
