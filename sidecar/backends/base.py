"""The one interface every backend implements."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from sidecar.observability.timing import Timing

# Yielded by a stream while the source is silent, so the writer can send a heartbeat.
HEARTBEAT = b""


@dataclass(slots=True)
class Call:
    """One request on its way to a backend."""

    endpoint: str  # "chat/completions", "completions" or "embeddings"
    body: bytes  # the client's JSON object, its `model` set to the target's model
    request_id: str
    timing: Timing


class Backend(Protocol):
    async def complete(self, call: Call) -> bytes:
        """The whole JSON response body of a non-streamed request."""
        ...

    def stream(self, call: Call) -> AsyncGenerator[bytes, None]:
        """The `data` of each stream event (OpenAI chunk JSON) as it arrives, `[DONE]` excluded.

        Errors raised before the first item mean nothing was sent; after it, the stream broke.
        """
        ...

    async def close(self) -> None: ...
