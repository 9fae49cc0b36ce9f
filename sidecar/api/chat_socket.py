"""Chat completions over a WebSocket (`GET /v1/chat/completions/ws`): the client sends a chat
body as a message and gets the chunk objects an SSE stream carries, one message each, then
`{"type": "done", "usage": ...}`; `{"type": "cancel"}` stops the response in flight. One
response at a time per socket; each goes through the path like an HTTP request."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from sidecar.api.sockets import MessageRate, admit, counted, observed, socket_response
from sidecar.appkeys import CONTEXT, GATEWAY, SETTINGS, SOCKETS
from sidecar.errors import InvalidRequest, RateLimited, SidecarError
from sidecar.exchange import Answer, Exchange
from sidecar.observability.timing import RequestContext
from sidecar.protocol.requests import ChatCompletionRequest, decode_body, validate
from sidecar.security.jwt import Principal

routes = web.RouteTableDef()
log = logging.getLogger("sidecar")


@routes.get("/v1/chat/completions/ws")
async def chat_socket(request: web.Request) -> web.StreamResponse:
    principal = await admit(request)
    socket = socket_response(request)
    await socket.prepare(request)
    await ChatSocket(request, socket, principal).serve()
    return socket


class ChatSocket:
    """One open socket: its messages in order, and the one response in flight. A message
    without `type` is a chat completion request; `{"type": "cancel"}` cancels."""

    CREATE: str | None = None  # the `type` of a request message; None: it has none
    CANCEL = "cancel"
    CANCELLED = "cancelled"  # the message that ends a cancelled response
    IN_FLIGHT = "request_already_in_flight"

    def __init__(self, request: web.Request, socket: web.WebSocketResponse,
                 principal: Principal) -> None:
        self._request = request
        self._socket = socket
        self._principal = principal
        self._rate = MessageRate(request.app[SETTINGS].server.ws_messages_per_minute)
        self._ids = itertools.count(1)
        self._in_flight: asyncio.Task[None] | None = None

    async def serve(self) -> None:
        sockets = self._request.app[SOCKETS]
        socket = self._socket
        sockets.opened(socket)
        try:
            async for message in socket:
                if message.type != WSMsgType.TEXT:
                    await self._error(InvalidRequest("Messages must be JSON text frames."))
                    continue
                if not self._rate.allow():
                    await self._error(RateLimited("This socket sent more messages a minute "
                                                  "than the server accepts."))
                    await socket.close(code=WSCloseCode.POLICY_VIOLATION,
                                       message=b"message rate limit")
                    break
                await self._receive(message.data)
        finally:
            task = self._in_flight
            if task is not None and not task.done():
                # The client left: its target's work is cancelled, as for an HTTP client.
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await sockets.closed(socket)

    async def _receive(self, text: str) -> None:
        try:
            payload = decode_body(text.encode())
        except SidecarError as exc:
            await self._error(exc)
            return
        kind = payload.get("type")
        if kind == self.CANCEL:
            task = self._in_flight
            if task is not None and not task.done():
                task.cancel()
            return
        if kind != self.CREATE:
            create = f'`{{"type": "{self.CREATE}", ...}}`' if self.CREATE else "a request"
            await self._error(InvalidRequest(
                f'A message is {create} or `{{"type": "{self.CANCEL}"}}`.', param="type"))
            return
        if self.CREATE is not None:
            del payload["type"]
        if self._in_flight is not None and not self._in_flight.done():
            await self._error(InvalidRequest(
                "A response is in flight on this socket; cancel it or wait for its end.",
                code=self.IN_FLIGHT))
            return
        self._request.app[SOCKETS].busy(self._socket, True)
        self._in_flight = asyncio.create_task(self._respond(payload))
        self._in_flight.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        sockets = self._request.app[SOCKETS]
        sockets.busy(self._socket, False)
        if sockets.draining and not self._socket.closed:
            sockets.drain()

    async def _respond(self, payload: dict[str, Any]) -> None:
        context = RequestContext(
            f"{self._request[CONTEXT].request_id}-{next(self._ids)}", self._principal)
        status, failure = 200, None
        try:
            async with counted(self._request, self._principal):
                await self._answer(payload, context)
        except SidecarError as exc:
            status, failure = exc.status, exc
            await self._error(exc)
        except asyncio.CancelledError:
            status = 499  # cancelled by the client, as for one that leaves an HTTP request
            await self._send({"type": self.CANCELLED})
            raise
        except ConnectionError:
            status = 499  # the client left; the socket's loop ends on its own
        except Exception:
            # A fault of ours ends the turn with an error message, as the edge middleware
            # answers an HTTP request with a 500; unanswered, the client would wait forever.
            log.exception("unhandled error",
                          extra={"fields": {"request_id": context.request_id}})
            failure = SidecarError("The sidecar failed to handle this request (request id "
                                   f"{context.request_id}).")
            status = failure.status
            await self._error(failure)
        finally:
            observed(self._request, context, status, failure)

    async def _answer(self, payload: dict[str, Any], context: RequestContext) -> None:
        parsed = validate(payload, ChatCompletionRequest)
        asked_usage = parsed.stream_options is not None and parsed.stream_options.include_usage
        # A socket's answer is always a stream, with the usage for its `done` message.
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
        exchange = Exchange("chat/completions", orjson.dumps(payload), payload, parsed.model,
                            context, self._request.headers)
        exchange.stream = True
        exchange.include_usage = True
        exchange.max_output_tokens = parsed.max_completion_tokens or parsed.max_tokens
        exchange.choices = parsed.n or 1
        context.record.stream = True
        answer = await self._request.app[GATEWAY].open(exchange)
        usage: Any = None
        send = self._socket.send_str
        try:
            async for data in chunks_of(answer):
                if b'"usage"' in data:
                    try:
                        chunk = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        chunk = None  # passed on as it came, as over SSE
                    if isinstance(chunk, dict) and chunk.get("usage"):
                        usage = chunk["usage"]
                        if not chunk.get("choices") and not asked_usage:
                            continue  # the usage chunk the client did not ask for
                # An upstream's bytes that are not UTF-8 cannot be a text message as they are.
                await send(data.decode("utf-8", "replace"))
        finally:
            await answer.close()
        await self._send({"type": "done", "usage": usage})

    async def _error(self, error: SidecarError) -> None:
        await self._send({"type": "error", **error.body()})

    async def _send(self, message: dict[str, Any]) -> None:
        if not self._socket.closed:
            with contextlib.suppress(ConnectionError):
                await self._socket.send_str(orjson.dumps(message).decode())


async def chunks_of(answer: Answer) -> AsyncIterator[bytes]:
    """The answer's chunks, without the empty items a silent source yields (the socket pings
    on its own)."""
    if answer.first is None:
        return
    if answer.first:
        yield answer.first
    if answer.events is not None:
        async for data in answer.events:
            if data:
                yield data
