"""The internal form that connects protocols where they differ: a chat request, and the events
of its answer (text deltas, tool-call deltas, the finish reason, usage, an error). Pure data;
each protocol's module translates to and from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sidecar.errors import SidecarError

# The most tokens an upstream's count may say. Past it, a count is not a count (no answer is
# that long): a few such counts summed would not fit the 64 bits a JSON writer takes, and
# JavaScript clients read numbers exactly only up to here.
MAX_COUNT = 2**53
# The deepest a JSON value held inside a string (a tool call's arguments) may nest once parsed
# into a body we write: the same bound as a request body's, far under the 254 levels orjson
# writes (it reads 1,024).
MAX_NESTING = 64


def nests_within(value: object, limit: int = MAX_NESTING) -> bool:
    """True when the parsed JSON `value` nests no deeper than `limit` objects and arrays
    (looked at level by level, so a deep value costs no recursion)."""
    level = [value]
    for _ in range(limit):  # after k rounds, `level` holds what sits below k containers
        level = [inner for node in level if isinstance(node, dict | list)
                 for inner in (node.values() if isinstance(node, dict) else node)]
        if not level:
            return True
    return not any(isinstance(node, dict | list) for node in level)


@dataclass(slots=True)
class ImagePart:
    url: str  # an http(s) URL, or a data: URL that holds the image
    detail: str | None = None  # OpenAI's "low" | "high" | "auto"


@dataclass(slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str  # the message's text (its text parts joined by newlines)
    # An assistant's tool calls ({"id", "name", "arguments"}), or the call a tool message
    # answers.
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    tool_call_id: str | None = None
    # The content in its order when it holds images (text parts as strings); empty for a
    # message of text only, which `content` says whole.
    parts: list[str | ImagePart] = field(default_factory=list)


@dataclass(slots=True)
class ChatRequest:
    model: str
    messages: list[ChatMessage] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    # Function tools as OpenAI describes them: {"name", "description", "parameters"}.
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class ToolCallDelta:
    index: int
    id: str | None = None  # set on a call's first delta
    name: str | None = None  # likewise
    arguments: str = ""  # a piece of the JSON arguments


@dataclass(slots=True)
class Finish:
    reason: str  # "stop" | "length" | "tool_calls" | "content_filter"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int  # every input token, those read from a prompt cache included
    completion_tokens: int
    cached_tokens: int | None = None  # of the prompt's, those read from a prompt cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class StreamFailure:
    error: SidecarError


Event = TextDelta | ToolCallDelta | Finish | Usage | StreamFailure
