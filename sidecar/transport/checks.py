"""What the configuration must get right for the transport, checked when it loads so that a
mistake is a clear message at start-up rather than a failed request later."""

from __future__ import annotations

import os
import ssl

from sidecar.settings import UpstreamSettings
from sidecar.transport.client import check_header
from sidecar.transport.dial import Proxy, tls_context


def upstream_problem(settings: UpstreamSettings) -> tuple[str, str] | None:
    """(key, what is wrong) for the first problem found, or None."""
    if settings.proxy:
        try:
            Proxy.of(settings.proxy)
        except ValueError as exc:
            return "proxy", str(exc)  # never the URL itself: it may hold a password
    if settings.ca_file is not None:
        if not os.path.isfile(settings.ca_file):
            return "ca_file", f"no such file: {settings.ca_file!r}"
        try:
            tls_context(settings.ca_file)
        except (ssl.SSLError, OSError) as exc:
            return "ca_file", f"not a PEM bundle of CA certificates ({exc})"
    for name, value in settings.headers.items():
        try:
            check_header(name, value)
        except ValueError:
            return "headers", f"header {name!r} holds a line break or another character " \
                              "HTTP does not allow there"
    return None
