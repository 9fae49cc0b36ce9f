"""Small helpers for writing responses."""

from __future__ import annotations

from aiohttp import web
from aiohttp.hdrs import ACCEPT_ENCODING

from sidecar.errors import SidecarError

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
