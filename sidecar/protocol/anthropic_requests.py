"""The Anthropic Messages request bodies the sidecar understands (`POST /v1/messages` and
`/v1/messages/count_tokens`), validated once at the edge. As with OpenAI's
(sidecar/protocol/requests.py), only what the sidecar reads or must refuse is declared: a
target that speaks Messages gets the client's own object with its `model` rewritten."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

# Anthropic's limits, refused here whatever the target, so a client learns of them at once.
MAX_TOOL_NAME = 64
Probability = Annotated[float, Meta(ge=0, le=1)]
PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
ToolName = Annotated[str, Meta(min_length=1, max_length=MAX_TOOL_NAME)]


class Block(Struct):
    type: str


class TextBlock(Struct):
    text: str
    type: str = "text"


class Turn(Struct):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(Struct, kw_only=True):
    name: ToolName
    type: str | None = None  # a custom tool, or one of Anthropic's own ("web_search_...")
    input_schema: dict[str, object] | None = None
    description: str | None = None


class ToolChoice(Struct, kw_only=True):
    type: Literal["auto", "any", "tool", "none"]
    name: ToolName | None = None
    disable_parallel_tool_use: bool | None = None


class Metadata(Struct, kw_only=True):
    user_id: Annotated[str, Meta(max_length=256)] | None = None


class CountTokensRequest(Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1)]
    messages: Annotated[list[Turn], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


class MessagesRequest(CountTokensRequest, kw_only=True):
    max_tokens: PositiveInt
    stream: bool = False
    temperature: Probability | None = None
    top_p: Probability | None = None
    top_k: NonNegativeInt | None = None
    stop_sequences: list[str] | None = None
    metadata: Metadata | None = None
