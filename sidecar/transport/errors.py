"""What can go wrong on the way to an upstream, one exception per cause, so that the caller
can tell a request that never left (safe to send again) from one that broke half-way."""

from __future__ import annotations


class TransportError(Exception):
    """Any failure of the upstream leg. Messages never quote a URL's credentials."""


class ConnectFailed(TransportError):
    """No connection: refused, unresolvable, TLS refused, or the proxy would not tunnel.
    Nothing was sent."""


class ConnectTimeout(ConnectFailed):
    """The connection (TCP, proxy tunnel and TLS handshake) took longer than allowed."""


class Disconnected(TransportError):
    """The peer closed the connection before the response's headers were complete."""


class HeadersTimeout(TransportError):
    """The request went out, but the response's headers did not arrive in time."""


class ReadTimeout(TransportError):
    """The response's body stopped arriving for longer than the idle-read limit."""


class BodyBroken(TransportError):
    """The connection ended, or was reset, before the response's body was complete."""


class ProtocolViolation(TransportError):
    """A response that cannot be read safely: malformed, smuggling-shaped, over a limit, or
    bytes nobody asked for. The connection is closed, never reused."""
