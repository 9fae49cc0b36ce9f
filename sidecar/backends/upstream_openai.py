"""Any OpenAI-compatible upstream. The client's bytes go out and the upstream's come back;
nothing is translated, so a proxied request costs little more than the socket work. Trusted no
further: its answers are bounded in size as they arrive, its redirects are not followed, its
Retry-After is bounded, and its words are scrubbed of the operator's key (all of which it
shares with other upstreams: sidecar/backends/http_upstream.py)."""

from __future__ import annotations

from sidecar.backends.base import Call
from sidecar.backends.http_upstream import HttpUpstream
from sidecar.protocol.sse import DONE
from sidecar.settings import ProviderSettings, Secret
from sidecar.transport import UpstreamClient


class OpenAIUpstream(HttpUpstream):
    protocol = "openai"  # its calls and answers; others are translated on the way
    default_max_tokens: int | None = None  # OpenAI's API needs no limit

    def __init__(self, name: str, settings: ProviderSettings, api_key: Secret | None,
                 client: UpstreamClient, heartbeat_s: float) -> None:
        super().__init__(name, settings, settings.base_url, api_key, client, heartbeat_s)
        self.responses = settings.responses  # Responses requests pass through as bytes

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def path(self, call: Call) -> str:
        return f"{self._base}/{call.endpoint}"

    def ends(self, data: bytes) -> bool:
        return data == DONE

    async def probe(self) -> bool:
        """GET {base_url}/models: any answer below 500 means the upstream is there."""
        return await self._probe(f"{self._base}/models")
