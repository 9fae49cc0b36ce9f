"""What every WebSocket of the API shares: who may open one (an `Origin` on the allow-list, the
token on the upgrade), how fast a client may send, the count of a tenant's responses against
its limits, and the drain that closes open sockets with code 1001 once their response in
flight is over."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, hdrs, web

from sidecar.appkeys import ACCESS_LOG, LIMITER, METRICS, SETTINGS, TICKETS, VERIFIER
from sidecar.errors import BrowserRefused, SidecarError
from sidecar.observability.timing import RequestContext
from sidecar.security.jwt import ANONYMOUS, Forbidden, Principal, bearer

# The WebSocket endpoints (GET): the edge's guard leaves them to the socket, whose upgrade is
# refused here with the same errors, and whose tenant limits count per response.
SOCKET_PATHS = frozenset({"/v1/chat/completions/ws", "/v1/responses"})
PING_S = 20.0
# A browser offers two subprotocols: this one, which the server selects (a browser refuses a
# handshake that selects none of those it offered), and `ticket.<ticket>`.
SUBPROTOCOL = "llm-sidecar"
TICKET_PREFIX = "ticket."


def admits_itself(request: web.Request) -> bool:
    return request.method == "GET" and request.path in SOCKET_PATHS


async def admit(request: web.Request) -> Principal:
    """The principal a socket acts for, or the refusal of its upgrade (403, 401)."""
    settings = request.app[SETTINGS]
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None and origin not in settings.server.ws_allowed_origins:
        # A browser page of another site would otherwise ride on the user's credentials.
        raise BrowserRefused(f"WebSockets from the origin `{origin[:100]}` are not accepted; "
                             "list it in server.ws_allowed_origins if it is yours.")
    verifier = request.app[VERIFIER]
    if verifier is None:
        return ANONYMOUS
    ticket = offered_ticket(request)
    if ticket is not None and hdrs.AUTHORIZATION not in request.headers:
        principal = request.app[TICKETS].redeem(ticket)
    else:
        principal = await verifier.verify(bearer_token(request))
    needed = settings.auth.chat_scope
    if needed not in principal.scopes:
        raise Forbidden(f"The token lacks the `{needed}` scope this request needs.")
    return principal


def offered_ticket(request: web.Request) -> str | None:
    """The ticket among the subprotocols a browser offers (`ticket.<ticket>`), if any."""
    offered = request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "")
    for name in offered.split(",")[:8]:
        name = name.strip()
        if name.startswith(TICKET_PREFIX) and len(name) <= 128:
            return name[len(TICKET_PREFIX):]
    return None


def bearer_token(request: web.Request) -> str:
    return bearer(request.headers.get(hdrs.AUTHORIZATION),
                  "This WebSocket needs an `Authorization: Bearer <token>` header on its "
                  "upgrade, or a ticket from POST /v1/ws-tickets offered as the subprotocol "
                  f"`{TICKET_PREFIX}<ticket>`.")


def socket_response(request: web.Request) -> web.WebSocketResponse:
    """A WebSocket with the server's limits: message size, and a ping every 20 s (a peer that
    does not answer within half of that is closed)."""
    settings = request.app[SETTINGS].server
    return web.WebSocketResponse(heartbeat=PING_S, max_msg_size=settings.ws_max_message_bytes,
                                 compress=False, protocols=(SUBPROTOCOL,))


@contextlib.asynccontextmanager
async def counted(request: web.Request, principal: Principal) -> AsyncIterator[None]:
    """One response of a socket, counted as a request: the process's cap on requests in
    flight and the tenant's request budget, as the edge counts an HTTP request."""
    limiter = request.app[LIMITER]
    limiter.enter()
    try:
        if limiter.requests is not None:
            shared = limiter.shared_requests
            if shared is None:
                limiter.requests.take(principal.tenant, 1)
            else:
                await shared.take(principal.tenant, 1)
        yield
    finally:
        limiter.leave()


def observed(request: web.Request, context: RequestContext, status: int,
             failure: SidecarError | None) -> None:
    """A socket's response, logged and counted as the edge does an HTTP request: one line
    (method `WS`, the socket's path) and the metrics, from the response's record."""
    metrics = request.app[METRICS]
    if metrics is not None:
        metrics.observe(request.path, context, status, failure, time.perf_counter())
    access_log = request.app[ACCESS_LOG]
    if not access_log.enabled:
        return
    fields, timing = context.fields, context.timing
    context.record.log_fields(fields)
    fields["tenant"] = context.principal.tenant
    fields["request_id"] = context.request_id
    fields["method"] = "WS"
    fields["path"] = request.path
    fields["status"] = status
    fields["duration_us"] = int(timing.elapsed_ms() * 1000)
    fields["upstream_us"] = int(timing.upstream * 1e6)
    access_log.write(fields)


class MessageRate:
    """A client's messages in the last minute, as a bucket that refills continuously."""

    __slots__ = ("_level", "_per_minute", "_stamp")

    def __init__(self, per_minute: int) -> None:
        self._per_minute = float(per_minute)
        self._level = float(per_minute)
        self._stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._level = min(self._per_minute,
                          self._level + (now - self._stamp) * self._per_minute / 60.0)
        self._stamp = now
        if self._level < 1.0:
            return False
        self._level -= 1.0
        return True


class OpenSockets:
    """The sockets open now, so that a stopping server can close them: an idle one at once,
    a busy one once its response in flight ends (code 1001, going away)."""

    def __init__(self) -> None:
        self._idle: dict[web.WebSocketResponse, bool] = {}  # socket → idle now
        self._closing: dict[web.WebSocketResponse, asyncio.Task[bool]] = {}
        self.draining = False

    def __len__(self) -> int:
        return len(self._idle)

    def opened(self, socket: web.WebSocketResponse) -> None:
        self._idle[socket] = True

    async def closed(self, socket: web.WebSocketResponse) -> None:
        """The socket's handler is ending: its close frame, when the drain sends one, goes
        out before the handler returns and the connection is let go."""
        self._idle.pop(socket, None)
        closing = self._closing.pop(socket, None)
        if closing is not None:
            with contextlib.suppress(ConnectionError):
                await closing

    def busy(self, socket: web.WebSocketResponse, busy: bool) -> None:
        if socket in self._idle:
            self._idle[socket] = not busy

    def drain(self) -> None:
        self.draining = True
        for socket, idle in list(self._idle.items()):
            if idle and socket not in self._closing:
                self._closing[socket] = asyncio.create_task(going_away(socket))


async def going_away(socket: web.WebSocketResponse) -> bool:
    return await socket.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
