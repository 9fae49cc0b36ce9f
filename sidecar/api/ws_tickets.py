"""`POST /v1/ws-tickets`: a short-lived, single-use ticket that opens one WebSocket as the
caller's principal, for a browser, which cannot set `Authorization` on a WebSocket. The page
offers it as the subprotocol `ticket.<ticket>` beside `llm-sidecar`."""

from __future__ import annotations

import orjson
from aiohttp import web

from sidecar.api.http import JSON
from sidecar.api.sockets import SUBPROTOCOL, TICKET_PREFIX
from sidecar.appkeys import CONTEXT, TICKETS

routes = web.RouteTableDef()


@routes.post("/v1/ws-tickets")
async def issue_ticket(request: web.Request) -> web.Response:
    book = request.app[TICKETS]
    ticket, expires_at = book.issue(request[CONTEXT].principal)
    body = {"object": "websocket.ticket", "ticket": ticket, "expires_at": int(expires_at),
            "protocols": [SUBPROTOCOL, TICKET_PREFIX + ticket]}
    response = web.Response(body=orjson.dumps(body), content_type=JSON)
    response.headers["Cache-Control"] = "no-store"
    return response
