"""An upstream that speaks Anthropic's Messages API (Claude). Its calls are Messages requests
and its answers Messages answers and stream events, passed on as they come: a front door of
another protocol has them translated on the way (sidecar/crossing.py). A stream's first event
waits for the answer's first word, and an `error` event ends the stream as an error, so that
an overload reported at once lets another target answer. The transport (timeouts, retries
before the first byte, size limits, scrubbing) is every HTTP upstream's:
sidecar/backends/http_upstream.py."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import orjson

from sidecar.backends.base import HEARTBEAT, Call
from sidecar.backends.http_upstream import HttpUpstream
from sidecar.errors import UpstreamError
from sidecar.settings import AnthropicProviderSettings, Secret
from sidecar.transport import UpstreamClient

# What Anthropic's events start with, as it writes them; the `data` of an error event, and of
# the events that come before the answer's first word.
_ERROR = b'{"type":"error"'
_PREAMBLE = (b'{"type":"message_start"', b'{"type":"ping"')


class AnthropicUpstream(HttpUpstream):
    stream_end = "message_stop"
    protocol = "anthropic"

    def __init__(self, name: str, settings: AnthropicProviderSettings, api_key: Secret | None,
                 client: UpstreamClient, heartbeat_s: float) -> None:
        super().__init__(name, settings, settings.base_url, api_key, client, heartbeat_s)
        self._headers["anthropic-version"] = settings.anthropic_version
        self.default_max_tokens: int | None = settings.default_max_tokens

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"x-api-key": key}

    def path(self, call: Call) -> str:
        # "messages" or "messages/count_tokens"
        return f"{self._base}/v1/{call.endpoint}"

    def ends(self, data: bytes) -> bool:
        # The event's type, as Anthropic writes it; a string inside the text cannot match,
        # since its quotes would be escaped.
        return b'"message_stop"' in data

    async def probe(self) -> bool:
        """GET {base_url}/v1/models: any answer below 500 means the upstream is there."""
        return await self._probe(f"{self._base}/v1/models")

    async def stream(self, call: Call) -> AsyncGenerator[bytes, None]:
        events = super().stream(call)
        held: list[bytes] | None = []  # message_start and pings, until the first word
        try:
            async for data in events:
                if data.startswith(_ERROR):
                    raise self._stream_error(data)
                if held is None:
                    yield data
                elif data.startswith(_PREAMBLE):
                    held.append(data)
                else:  # the first word, or a heartbeat: the stream is under way
                    if data == HEARTBEAT and not held:
                        yield data  # nothing came yet: a heartbeat, still before the start
                        continue
                    for early in held:
                        yield early
                    held = None
                    yield data
            for early in held or ():  # an answer without a word
                yield early
        finally:
            await events.aclose()

    def _stream_error(self, data: bytes) -> UpstreamError:
        """An error event as the error it reports (its words scrubbed upstream of here)."""
        try:
            error = orjson.loads(data).get("error")
        except (orjson.JSONDecodeError, AttributeError):
            error = None
        fields = error if isinstance(error, dict) else {}
        name, text = fields.get("type"), fields.get("message")
        return UpstreamError(f"The upstream `{self.name}`'s stream failed "
                             f"({str(name or 'error')[:100]}): {str(text or 'no detail')[:1000]}")
