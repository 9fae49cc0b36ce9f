"""Anthropic's Messages API as a front door speaks it, to and from the internal form
(sidecar/protocol/chat.py): a client's Messages request as a `ChatRequest`, and the events of
an answer as a whole message or as Messages stream events. Pure: no I/O. The other direction
(a `ChatRequest` sent to Claude, Claude's answer read back) is sidecar/protocol/anthropic.py."""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.errors import InvalidRequest
from sidecar.protocol.anthropic import StreamState, answer_events
from sidecar.protocol.chat import (
    MAX_COUNT,
    ChatMessage,
    ChatRequest,
    Event,
    Finish,
    ImagePart,
    StreamFailure,
    TextDelta,
    ToolCallDelta,
    Usage,
    nests_within,
)

# OpenAI's finish reason as Anthropic's stop reason.
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "function_call": "tool_use", "content_filter": "refusal"}
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def request_from_anthropic(payload: dict[str, Any]) -> ChatRequest:
    """A validated Messages request body (sidecar/api/anthropic_schema.py) as the internal
    form. Thinking settings and thinking blocks are dropped: a target of another protocol
    does not think aloud, and its answer is still an answer."""
    metadata = payload.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    top_k = payload.get("top_k")
    # Validated on /v1/messages; /v1/messages/count_tokens does not declare it, so there a
    # value that is not a count reads as none, as a top_k does.
    limit = payload.get("max_tokens")
    request = ChatRequest(
        model=str(payload["model"]),
        max_tokens=limit if isinstance(limit, int) and not isinstance(limit, bool)
        and 0 < limit <= MAX_COUNT else None,
        temperature=_number(payload.get("temperature")),
        top_p=_number(payload.get("top_p")),
        top_k=top_k if isinstance(top_k, int) and not isinstance(top_k, bool) else None,
        stop=tuple(payload.get("stop_sequences") or ()),
        stream=bool(payload.get("stream")),
        include_usage=True,  # the last event reports the usage, always
        user=user if isinstance(user, str) else None,
    )
    system = payload.get("system")
    if isinstance(system, list):
        system = "\n\n".join(b["text"] for b in system
                             if isinstance(b, dict) and isinstance(b.get("text"), str))
    if isinstance(system, str) and system:
        request.messages.append(ChatMessage("system", system))
    for i, message in enumerate(payload["messages"]):
        request.messages.extend(_turn(message, i))
    for i, tool in enumerate(payload.get("tools") or ()):
        if tool.get("type") not in (None, "custom"):
            raise InvalidRequest(
                f"The tool `tools[{i}]` is one of Anthropic's own ({str(tool['type'])[:64]}); "
                "this model's target does not run it.", param=f"tools[{i}]",
                code="unsupported_tool")
        function = {"name": tool["name"], "parameters": tool.get("input_schema") or
                    {"type": "object", "properties": {}}}
        if tool.get("description"):
            function["description"] = tool["description"]
        request.tools.append(function)
    choice = payload.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "tool":
            request.tool_choice = {"type": "function", "function": {"name": choice.get("name")}}
        elif kind in _TOOL_CHOICES:
            request.tool_choice = _TOOL_CHOICES[kind]
        if choice.get("disable_parallel_tool_use") is True and request.tools:
            request.parallel_tool_calls = False
    return request


def _turn(message: dict[str, Any], i: int) -> list[ChatMessage]:
    """One Messages turn as internal messages: a user turn's tool results come first, each
    a tool message of its own, then what the user said."""
    role = message["role"]
    content = message["content"]
    if isinstance(content, str):
        return [ChatMessage(role, content)]
    out: list[ChatMessage] = []
    texts: list[str] = []
    parts: list[str | ImagePart] = []
    calls: list[dict[str, str]] = []
    for j, block in enumerate(content):
        kind = block.get("type")
        where = f"messages[{i}].content[{j}]"
        if kind == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"Invalid value for `{where}.text`: expected a string.",
                                     param=f"{where}.text")
            texts.append(text)
            parts.append(text)
        elif kind == "image" and role == "user":
            parts.append(ImagePart(_image_url(block.get("source"), where)))
        elif kind == "tool_use" and role == "assistant":
            calls.append({"id": str(block.get("id", "")), "name": str(block.get("name", "")),
                          "arguments": orjson.dumps(block.get("input") or {}).decode()})
        elif kind == "tool_result" and role == "user":
            out.append(ChatMessage("tool", _result_text(block.get("content"), where),
                                   tool_call_id=str(block.get("tool_use_id", ""))))
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise InvalidRequest(
                f"This model's target reads text, images and tool turns; `{where}` is "
                f"{str(kind)[:64]!r} in a {role} turn.", param=where,
                code="unsupported_content")
    if texts or calls or any(isinstance(p, ImagePart) for p in parts):
        said = ChatMessage(role, "\n".join(texts), tool_calls=calls)
        if any(isinstance(p, ImagePart) for p in parts):
            said.parts = parts
        out.append(said)
    return out


def _image_url(source: object, where: str) -> str:
    if isinstance(source, dict):
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return str(source["url"])
        if source.get("type") == "base64" and isinstance(source.get("data"), str) and \
                isinstance(source.get("media_type"), str):
            return f"data:{source['media_type']};base64,{source['data']}"
    raise InvalidRequest(f"Invalid image at `{where}`: expected a base64 or url source.",
                         param=where, code="invalid_image")


def _result_text(content: object, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict) or block.get("type") != "text":
            raise InvalidRequest(f"This model's target reads tool results of text only; "
                                 f"`{where}` holds another kind.", param=where,
                                 code="unsupported_content")
        texts.append(str(block.get("text", "")))
    return "\n".join(texts)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def stop_reason(finish: str | None) -> str:
    """Anthropic's stop reason for OpenAI's finish reason."""
    return _STOP_REASONS.get(finish or "stop", "end_turn")


def usage_json(usage: Usage | None) -> dict[str, int]:
    """Anthropic counts the prompt's cached tokens apart from the rest of its input."""
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    cached = usage.cached_tokens or 0
    body = {"input_tokens": max(usage.prompt_tokens - cached, 0),
            "output_tokens": usage.completion_tokens}
    if usage.cached_tokens is not None:
        body["cache_read_input_tokens"] = cached
    return body


def message_json(head: dict[str, Any], events: list[Event]) -> bytes:
    """A whole Messages answer from the events of one generation; `head` holds its id and
    model."""
    blocks: list[dict[str, Any]] = []
    tools: dict[int, dict[str, Any]] = {}
    arguments: dict[int, list[str]] = {}
    finish: str | None = None
    usage: Usage | None = None
    for event in events:
        if isinstance(event, TextDelta):
            if blocks and blocks[-1]["type"] == "text":
                blocks[-1]["text"] += event.text
            else:
                blocks.append({"type": "text", "text": event.text})
        elif isinstance(event, ToolCallDelta):
            block = tools.get(event.index)
            if block is None:
                block = tools[event.index] = {"type": "tool_use", "id": "", "name": "",
                                              "input": {}}
                arguments[event.index] = []
                blocks.append(block)
            if event.id is not None:
                block["id"] = event.id
            if event.name is not None:
                block["name"] = event.name
            arguments[event.index].append(event.arguments)
        elif isinstance(event, Finish):
            finish = event.reason
        elif isinstance(event, Usage):
            usage = event
    for index, block in tools.items():
        block["input"] = _tool_input("".join(arguments[index]))
    return orjson.dumps({**head, "type": "message", "role": "assistant", "content": blocks,
                         "stop_reason": stop_reason(finish), "stop_sequence": None,
                         "usage": usage_json(usage)})


def _tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic's `input` is; arguments that are not
    a JSON object (a model's slip) are kept whole under one key rather than lost."""
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {"arguments": arguments}
    # Nested past what a body may hold: kept whole, as a string, like any other slip.
    return value if isinstance(value, dict) and nests_within(value) \
        else {"arguments": arguments}


class EventWriter:
    """The Messages stream events of one answer, from its events: message_start, a content
    block per run of text and per tool call (content_block_start, deltas, content_block_stop),
    then message_delta with the stop reason and usage. One per stream: the open block and
    which tool call is which block are this answer's own. message_stop is the writer's."""

    __slots__ = ("_blocks", "_finish", "_head", "_next", "_open", "_text", "_usage")

    def __init__(self, head: dict[str, Any]) -> None:
        self._head = head  # id and model
        self._next = 0  # the next content block's index
        self._open: int | None = None  # the open block's index
        self._text = False  # the open block is text
        self._blocks: dict[int, int] = {}  # tool call index -> content block index
        self._finish: str | None = None
        self._usage: Usage | None = None

    def start(self) -> bytes:
        return orjson.dumps({"type": "message_start", "message": {
            **self._head, "type": "message", "role": "assistant", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def event(self, event: Event) -> list[bytes]:
        """The stream events that say one event (none for the finish reason and usage,
        which the last one says)."""
        if isinstance(event, TextDelta):
            out = [] if self._text else self._open_block({"type": "text", "text": ""})
            self._text = True
            return [*out, self._delta({"type": "text_delta", "text": event.text})]
        if isinstance(event, ToolCallDelta):
            block = self._blocks.get(event.index)
            out = []
            if block is None:
                out = self._open_block({"type": "tool_use", "id": event.id or "",
                                        "name": event.name or "", "input": {}})
                block = self._blocks[event.index] = self._next - 1
            if event.arguments:
                out.append(self._delta({"type": "input_json_delta",
                                        "partial_json": event.arguments}, block))
            return out
        if isinstance(event, Finish):
            self._finish = event.reason
        elif isinstance(event, Usage):
            self._usage = event
        elif isinstance(event, StreamFailure):
            raise event.error
        return []

    def end(self) -> list[bytes]:
        """The answer's last events: the open block closed, then the stop reason and usage."""
        out = self._close()
        out.append(orjson.dumps({"type": "message_delta", "delta": {
            "stop_reason": stop_reason(self._finish), "stop_sequence": None},
            "usage": usage_json(self._usage)}))
        return out

    def _open_block(self, block: dict[str, Any]) -> list[bytes]:
        out = self._close()
        self._open = self._next
        self._next += 1
        out.append(orjson.dumps({"type": "content_block_start", "index": self._open,
                                 "content_block": block}))
        return out

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        self._text = False
        return [orjson.dumps({"type": "content_block_stop", "index": index})]

    def _delta(self, delta: dict[str, Any], index: int | None = None) -> bytes:
        return orjson.dumps({"type": "content_block_delta",
                             "index": self._open if index is None else index, "delta": delta})


def message_as_events(body: bytes) -> list[bytes] | None:
    """A kept Messages answer as the stream events that say it (for a cache hit asked as a
    stream); None when it is not a message."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict) or message.get("type") != "message":
        return None
    writer = EventWriter({"id": str(message.get("id") or ""),
                          "model": str(message.get("model") or "")})
    out = [writer.start()]
    for event in answer_events(message):
        out += writer.event(event)
    return out + writer.end()


def events_as_message(events: list[bytes]) -> bytes | None:
    """Kept Messages stream events as the whole answer they spell (for a cache hit asked as
    a message); None when they do not make one."""
    state = StreamState()
    said: list[Event] = []
    for data in events:
        said += state.feed(data)
    if state.id is None or any(isinstance(e, StreamFailure) for e in said):
        return None
    return message_json({"id": state.id, "model": state.model}, said)


def messages_usage(data: bytes, before: tuple[int, int, int, int] | None = None
                   ) -> tuple[int, int, int, int] | None:
    """The usage a Messages answer, or a stream event of one, reports: prompt (cached tokens
    included), completion and total tokens, and the prompt tokens read from the cache. A
    stream says it in parts (message_start, then message_delta): `before` is what it said."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return before
    if not isinstance(parsed, dict):
        return before
    # Messages' message_start nests it in `message`; a Responses stream's final event in
    # `response` (its names are the same: input_tokens, output_tokens).
    message = parsed.get("message") or parsed.get("response")
    raw = (message if isinstance(message, dict) else parsed).get("usage")
    if not isinstance(raw, dict):
        return before
    prompt, completion, _, cached = before or (0, 0, 0, -1)

    def count(name: str) -> int | None:
        value = raw.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) \
            and 0 <= value <= MAX_COUNT else None

    if count("input_tokens") is not None:
        read = count("cache_read_input_tokens") or 0
        prompt = (count("input_tokens") or 0) + read + (count("cache_creation_input_tokens")
                                                        or 0)
        cached = read if count("cache_read_input_tokens") is not None else cached
    if count("output_tokens") is not None:
        completion = count("output_tokens") or 0
    return prompt, completion, prompt + completion, cached
