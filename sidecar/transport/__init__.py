"""The upstream HTTP/1.1 transport: keep-alive pools per upstream on asyncio Protocols and
llhttp (`httptools`), TLS, an egress proxy, strict response parsing and one exception per
cause (sidecar/transport/errors.py). The backends reach it through UpstreamClient."""

from sidecar.transport.client import Response, UpstreamClient, check_header
from sidecar.transport.connection import Limits
from sidecar.transport.dial import tls_context

__all__ = ["Limits", "Response", "UpstreamClient", "check_header", "tls_context"]
