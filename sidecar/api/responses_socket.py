"""The Responses API over a WebSocket (`GET /v1/responses` upgraded), after OpenAI's WebSocket
mode: the client sends `{"type": "response.create", ...}` with the body it would POST
(without `stream`), and gets the events the SSE stream carries, one message each, through
`response.completed`; `{"type": "response.cancel"}` stops the response in flight, and a
`response.create` meanwhile gets an `error` with code `response_already_in_flight`."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from sidecar.api.chat_socket import ChatSocket, chunks_of
from sidecar.api.responses import ResponsesRequest
from sidecar.api.sockets import admit, socket_response
from sidecar.appkeys import GATEWAY
from sidecar.exchange import Exchange
from sidecar.observability.timing import RequestContext
from sidecar.protocol.requests import validate
from sidecar.responses_crossing import RESPONSES

routes = web.RouteTableDef()


@routes.get("/v1/responses")
async def responses_socket(request: web.Request) -> web.StreamResponse:
    principal = await admit(request)
    socket = socket_response(request)
    await socket.prepare(request)
    await ResponsesSocket(request, socket, principal).serve()
    return socket


class ResponsesSocket(ChatSocket):
    CREATE = "response.create"
    CANCEL = "response.cancel"
    CANCELLED = "response.cancelled"
    IN_FLIGHT = "response_already_in_flight"

    async def _answer(self, payload: dict[str, Any], context: RequestContext) -> None:
        payload["stream"] = True  # a socket's answer is always its events
        parsed = validate(payload, ResponsesRequest)
        exchange = Exchange("responses", orjson.dumps(payload), payload, parsed.model,
                            context, self._request.headers, protocol=RESPONSES)
        exchange.stream = True
        exchange.max_output_tokens = parsed.max_output_tokens
        context.record.stream = True
        answer = await self._request.app[GATEWAY].open(exchange)
        send = self._socket.send_str
        try:
            async for data in chunks_of(answer):
                await send(data.decode())
        finally:
            await answer.close()
