"""What a front door hands the request path, and what the path hands back: an `Exchange` (one
client request, in the protocol of the door it came through) and an `Answer` (a JSON body, or
a stream's first event and the rest, in that same protocol)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from sidecar.backends.base import Backend, Call

if TYPE_CHECKING:
    from sidecar.observability.timing import RequestContext
    from sidecar.protocol.chat import ChatRequest
    from sidecar.routing.table import Target

OPENAI = "openai"
ANTHROPIC = "anthropic"


class Exchange:
    """One client request as the path sees it. `body` is the client's own bytes: a target
    that speaks the front door's protocol receives them with only `model` rewritten; any
    other target gets them translated through the internal form (sidecar/crossing.py)."""

    __slots__ = ("body", "cacheable", "chat", "choices", "context", "endpoint", "headers",
                 "include_usage", "max_output_tokens", "model", "payload", "protocol", "stream")

    def __init__(self, endpoint: str, body: bytes, payload: dict[str, Any], model: str,
                 context: RequestContext, headers: Mapping[str, str],
                 protocol: str = OPENAI) -> None:
        # "chat/completions", "completions", "embeddings" (OpenAI); "messages",
        # "messages/count_tokens" (Anthropic)
        self.endpoint = endpoint
        self.body = body
        self.payload = payload
        self.model = model  # the public model name asked for
        self.context = context
        self.headers = headers  # the request's headers (Cache-Control)
        self.protocol = protocol  # what the body is written in, and the answer must be
        self.stream = False
        self.include_usage = False  # a stream's last chunk carries usage
        # For the token budget: the answer's length limit (None: the configured default;
        # 0: the endpoint generates nothing) and how many choices it generates.
        self.max_output_tokens: int | None = 0
        self.choices = 1
        self.cacheable = True
        # The request in the internal form, once a target of another protocol needed it.
        self.chat: ChatRequest | None = None

    def body_for(self, target: Target) -> bytes:
        if target.model == self.model:
            return self.body
        self.payload["model"] = target.model
        return orjson.dumps(self.payload)


class Answer:
    """What the path produced, in the front door's protocol (`protocol`): a whole JSON body, or
    a stream's first event and the rest. `close` must be called once the answer is written
    (or abandoned): it closes the stream and settles the token budget."""

    __slots__ = ("_done", "_settle", "body", "events", "first", "from_cache", "headers",
                 "protocol")

    def __init__(self, body: bytes = b"", events: AsyncGenerator[bytes, None] | None = None,
                 first: bytes | None = None, protocol: str = OPENAI) -> None:
        self.body = body
        self.events = events  # None for a JSON answer
        self.first = first  # a stream's first event; None for a stream with no event
        self.headers: dict[str, str] = {}
        self.protocol = protocol
        self.from_cache = False
        self._settle: Callable[[], None] | None = None
        self._done: Callable[[], None] | None = None  # the target's stream is over

    async def close(self) -> None:
        if self.events is not None:
            await self.events.aclose()
        done, self._done = self._done, None
        if done is not None:
            done()
        settle, self._settle = self._settle, None
        if settle is not None:
            settle()


async def opened(events: AsyncGenerator[bytes, None], protocol: str = OPENAI) -> Answer:
    """A stream with its first event read: nothing is sent to the client before that, so
    until then an error is a plain answer and another target may still serve the request."""
    try:
        first: bytes | None = await anext(events)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await events.aclose()
        raise
    return Answer(b"", events, first, protocol)


async def first_of(backend: Backend, call: Call) -> Answer:
    """A backend's stream, opened."""
    return await opened(backend.stream(call), backend.protocol)
