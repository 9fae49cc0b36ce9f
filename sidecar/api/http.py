"""Small helpers for writing responses."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.hdrs import ACCEPT_ENCODING

from sidecar.appkeys import SETTINGS
from sidecar.errors import RequestTimeout, SidecarError

JSON = "application/json"
# Below this size gzip costs more time than the bytes it saves.
GZIP_MIN_BYTES = 1024


def json_bytes(request: web.Request, body: bytes, status: int = 200) -> web.Response:
    response = web.Response(body=body, status=status, content_type=JSON)
    if len(body) >= GZIP_MIN_BYTES and "gzip" in request.headers.get(ACCEPT_ENCODING, ""):
        response.enable_compression(web.ContentCoding.gzip)
    return response


def error_response(error: SidecarError) -> web.Response:
    response = web.Response(body=error.to_json(), status=error.status, content_type=JSON)
    for name, value in error.headers.items():
        response.headers[name] = value
    if error.close_connection:
        response.force_close()
    return response


async def read_body(request: web.Request) -> bytes:
    """The request's body, within server.body_timeout_s."""
    if request.content.is_eof():  # usually the whole body came with the headers
        return await request.read()
    limit = request.app[SETTINGS].server.body_timeout_s
    try:
        async with asyncio.timeout(limit):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {limit:g}s.") from None
