"""The app's upstream clients: one per origin (with its proxy and CA), shared by every
provider configured there, each with its own pool; TLS contexts are built once per CA bundle,
off the event loop (loading a system's CAs reads files)."""

from __future__ import annotations

import asyncio
import ssl

from sidecar.settings import UpstreamSettings
from sidecar.transport.client import UpstreamClient
from sidecar.transport.dial import Origin, tls_context


class UpstreamClients:
    def __init__(self) -> None:
        self._clients: dict[tuple[Origin, str | None, str | None], UpstreamClient] = {}
        self._contexts: dict[str | None, ssl.SSLContext] = {}

    async def for_provider(self, settings: UpstreamSettings, base_url: str) -> UpstreamClient:
        """The client for `base_url`'s origin; the first provider there sets its pool's size
        and keep-alive time."""
        origin = Origin.of(base_url)
        key = (origin, settings.proxy, settings.ca_file)
        client = self._clients.get(key)
        if client is None:
            tls = None
            if origin.scheme == "https":
                tls = self._contexts.get(settings.ca_file)
                if tls is None:
                    tls = await asyncio.to_thread(tls_context, settings.ca_file)
                    self._contexts[settings.ca_file] = tls
            client = self._clients[key] = UpstreamClient(
                base_url, max_connections=settings.max_connections, idle_s=settings.keepalive_s,
                connect_timeout_s=settings.timeout_connect_s, proxy=settings.proxy, tls=tls)
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
