"""Opening a connection to an upstream: TCP, through an egress proxy's CONNECT tunnel when one
is configured, then TLS (verification on, SNI, TLS 1.2 at least, ALPN http/1.1), all within
the connect timeout. Also where the proxy is chosen (a provider's own, else HTTPS_PROXY /
HTTP_PROXY from the environment, honouring NO_PROXY; loopback never goes through one)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import ssl
import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from sidecar.transport.connection import Connection, Limits
from sidecar.transport.errors import ConnectFailed, ConnectTimeout, TransportError

# The head of a proxy's answer to CONNECT, at most.
_TUNNEL_ANSWER_LIMIT = 16 * 1024


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str  # "http" or "https"
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL with a host: {parts.scheme}://…")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP egress proxy; `authorization` is the Proxy-Authorization value, if any."""

    host: str
    port: int
    authorization: str | None = None

    @classmethod
    def of(cls, url: str) -> Proxy:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("an egress proxy is given as http://[user:password@]host:port")
        authorization = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(pair.encode()).decode()
        return cls(parts.hostname, parts.port or 80, authorization)

    def __repr__(self) -> str:  # never the credentials
        return f"Proxy({self.host}:{self.port})"


def choose_proxy(origin: Origin, configured: str | None) -> Proxy | None:
    """A provider's `proxy` wins ("" means none); otherwise the environment's, for this
    scheme, unless NO_PROXY names the host or the host is loopback."""
    if configured is not None:
        return Proxy.of(configured) if configured else None
    if _loopback(origin.host):
        return None
    found = urllib.request.getproxies_environment()
    url = found.get(origin.scheme)
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if not url or bypass(origin.host, found):
        return None
    return Proxy.of(url)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verification on, against the system's CAs or only `ca_file`'s (this reads files: call
    it off the event loop)."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


async def dial(origin: Origin, tls: ssl.SSLContext | None, proxy: Proxy | None,
               limits: Limits, connect_s: float) -> Connection:
    """A connection ready for a request, or ConnectFailed / ConnectTimeout."""
    loop = asyncio.get_running_loop()
    connection: Connection | None = None
    try:
        async with asyncio.timeout(connect_s):
            if proxy is None:
                _, connection = await loop.create_connection(
                    lambda: Connection(loop, limits), origin.host, origin.port, ssl=tls,
                    server_hostname=origin.host if tls is not None else None)
            else:
                _, connection = await loop.create_connection(
                    lambda: Connection(loop, limits), proxy.host, proxy.port)
                if tls is not None:
                    await _tunnel(connection, origin, proxy)
                    assert connection.transport is not None
                    wrapped = await loop.start_tls(connection.transport, connection, tls,
                                                   server_hostname=origin.host)
                    if wrapped is None:
                        raise ConnectFailed("TLS could not start over the proxy's tunnel")
                    connection.use_transport(wrapped)
            if tls is not None:
                _check_alpn(connection)
            return connection
    except TimeoutError:
        _drop(connection)
        raise ConnectTimeout(f"no connection within {connect_s:g}s") from None
    except ssl.SSLCertVerificationError as exc:
        _drop(connection)
        raise ConnectFailed(f"the upstream's certificate was refused: {exc.verify_message}"
                            ) from None
    except ssl.SSLError as exc:
        _drop(connection)
        raise ConnectFailed(f"TLS failed: {exc.reason or type(exc).__name__}") from None
    except TransportError as exc:
        _drop(connection)
        if isinstance(exc, ConnectFailed):
            raise
        raise ConnectFailed(f"the proxy's tunnel failed: {exc}") from None
    except OSError as exc:
        _drop(connection)
        raise ConnectFailed(exc.strerror or type(exc).__name__) from None
    except BaseException:
        _drop(connection)
        raise


async def _tunnel(connection: Connection, origin: Origin, proxy: Proxy) -> None:
    target = f"{origin.host if ':' not in origin.host else f'[{origin.host}]'}:{origin.port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if proxy.authorization is not None:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    connection.start_tunnel(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    status = await connection.tunnel_answer(_TUNNEL_ANSWER_LIMIT)
    if not 200 <= status < 300:
        raise ConnectFailed(f"the egress proxy refused the tunnel (HTTP {status})")


def _check_alpn(connection: Connection) -> None:
    assert connection.transport is not None
    tls = connection.transport.get_extra_info("ssl_object")
    chosen = tls.selected_alpn_protocol() if tls is not None else None
    if chosen not in (None, "http/1.1"):
        raise ConnectFailed(f"the upstream chose {chosen!r} by ALPN; only http/1.1 is spoken")


def _drop(connection: Connection | None) -> None:
    if connection is not None:
        connection.abort()
