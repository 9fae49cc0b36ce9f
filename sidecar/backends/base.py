"""The one interface every backend implements."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from sidecar.observability.timing import Timing
from sidecar.routing.router import RetryBudget

# Yielded by a stream while the source is silent, so the writer can send a heartbeat.
HEARTBEAT = b""


@dataclass(slots=True)
class Call:
    """One request on its way to a backend."""

    # "chat/completions", "completions", "embeddings", "messages" or "messages/count_tokens"
    endpoint: str
    body: bytes  # the client's JSON object, its `model` set to the target's model
    request_id: str
    timing: Timing
    # Retries are spent from this, shared with fallbacks, when the router gives one.
    budget: RetryBudget | None = None
    # No other target could take this request: a local engine that is loading makes it
    # wait rather than refusing it.
    patient: bool = True

    def may_retry(self) -> bool:
        return self.budget is None or self.budget.withdraw()


class Backend(Protocol):
    name: str  # the provider's name in the configuration
    # The protocol its calls are written in ("openai" or "anthropic"): a request of another
    # is translated on its way (sidecar/crossing.py).
    protocol: str
    # The answer's length limit put in a translated request that has none, where the
    # protocol requires one (Anthropic's does); None where it does not.
    default_max_tokens: int | None

    async def complete(self, call: Call) -> bytes:
        """The whole JSON response body of a non-streamed request."""
        ...

    def stream(self, call: Call) -> AsyncGenerator[bytes, None]:
        """The `data` of each stream event as it arrives, in the backend's protocol, its end
        marker excluded (OpenAI's `[DONE]`, Anthropic's `message_stop`).

        Errors raised before the first item mean nothing was sent; after it, the stream broke.
        """
        ...

    async def probe(self) -> bool:
        """A cheap check that the backend answers at all."""
        ...

    async def close(self) -> None: ...
