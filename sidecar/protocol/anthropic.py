"""Anthropic's Messages API to and from the internal form (sidecar/protocol/chat.py): a
`ChatRequest` as a Messages request body, and a Messages answer or stream as events. Pure: no
I/O. Where Anthropic's API is narrower than OpenAI's the request is fitted to it (temperature
clamped to 0..1, whitespace-only stop sequences dropped) or refused with a 400 that names the
field (a tool name over 64 characters, an image Anthropic cannot take)."""

from __future__ import annotations

import re
from typing import Any

import orjson

from sidecar.errors import InvalidRequest, UpstreamError
from sidecar.protocol.chat import (
    MAX_COUNT,
    MAX_NESTING,
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

# Anthropic refuses longer tool names; refused here, naming the tool, instead.
MAX_TOOL_NAME = 64
# The image types Anthropic reads from base64 data.
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,", re.ASCII)
_STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                 "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop",
                 "model_context_window_exceeded": "length"}
_TOOL_CHOICES = {"auto": "auto", "required": "any", "none": "none"}


def request_to_anthropic(request: ChatRequest, default_max_tokens: int) -> dict[str, Any]:
    """The internal form as a Messages request body."""
    body: dict[str, Any] = {"model": request.model,
                            "max_tokens": request.max_tokens or default_max_tokens}
    system = [m.content for m in request.messages if m.role == "system" and m.content]
    if system:
        body["system"] = "\n\n".join(system)
    body["messages"] = _messages(request.messages)
    stops = [s for s in request.stop if s.strip()]  # Anthropic refuses blank ones
    if stops:
        body["stop_sequences"] = stops
    if request.temperature is not None:
        # OpenAI's range is 0..2, Anthropic's 0..1: a hotter request gets Anthropic's hottest.
        body["temperature"] = min(max(request.temperature, 0.0), 1.0)
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.top_k is not None:
        body["top_k"] = request.top_k
    if request.user:
        body["metadata"] = {"user_id": request.user}
    if request.tools:
        body["tools"] = [_tool(tool, i) for i, tool in enumerate(request.tools)]
        choice = _tool_choice(request.tool_choice)
        if request.parallel_tool_calls is False:
            choice = choice or {"type": "auto"}
            if choice["type"] != "none":
                choice["disable_parallel_tool_use"] = True
        if choice is not None:
            body["tool_choice"] = choice
    if request.stream:
        body["stream"] = True
    return body


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Anthropic's turns: tool results are the user's, and consecutive turns of one role are
    joined into one (so the tool results of one step make one user turn)."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if message.role == "system":
            continue
        if message.role == "tool":
            role, blocks = "user", [_tool_result(message, i)]
        elif message.role == "assistant":
            role, blocks = "assistant", _assistant_blocks(message, i)
        elif message.role == "user":
            role, blocks = "user", _user_blocks(message, i)
        else:
            raise InvalidRequest(f"Invalid value for `messages[{i}].role`: {message.role!r}.",
                                 param=f"messages[{i}].role")
        if not blocks:
            continue  # Anthropic refuses empty turns; an empty message says nothing anyway
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return out


def _user_blocks(message: ChatMessage, i: int) -> list[dict[str, Any]]:
    if not message.parts:
        return [{"type": "text", "text": message.content}] if message.content else []
    blocks = []
    for j, part in enumerate(message.parts):
        if isinstance(part, ImagePart):
            blocks.append(_image(part, f"messages[{i}].content[{j}]"))
        elif part:
            blocks.append({"type": "text", "text": part})
    return blocks


def _image(part: ImagePart, param: str) -> dict[str, Any]:
    url = part.url
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    found = _DATA_URL.match(url)
    if found is None or found[1].lower() not in IMAGE_TYPES:
        raise InvalidRequest(
            f"Invalid image at `{param}`: expected an http(s) URL or a base64 data URL of "
            f"one of {', '.join(sorted(IMAGE_TYPES))}.", param=param, code="invalid_image")
    return {"type": "image", "source": {"type": "base64", "media_type": found[1].lower(),
                                        "data": url[found.end():]}}


def _assistant_blocks(message: ChatMessage, i: int) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    for j, call in enumerate(message.tool_calls):
        param = f"messages[{i}].tool_calls[{j}].function.arguments"
        try:
            arguments = orjson.loads(call["arguments"] or "{}")
        except orjson.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict) or not nests_within(arguments):
            raise InvalidRequest(f"Invalid value for `{param}`: expected a JSON object nested "
                                 f"at most {MAX_NESTING} levels.", param=param)
        blocks.append({"type": "tool_use", "id": call["id"], "name": call["name"],
                       "input": arguments})
    return blocks


def _tool_result(message: ChatMessage, i: int) -> dict[str, Any]:
    if not message.tool_call_id:
        raise InvalidRequest(f"`messages[{i}].tool_call_id` is required for a tool message.",
                             param=f"messages[{i}].tool_call_id")
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
    if message.content:
        result["content"] = message.content
    return result


def _tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    name = str(tool["name"])
    if len(name) > MAX_TOOL_NAME:
        raise InvalidRequest(
            f"The tool name {name[:MAX_TOOL_NAME]!r}... is {len(name)} characters long; this "
            f"model's provider takes at most {MAX_TOOL_NAME}.",
            param=f"tools[{i}].function.name", code="tool_name_too_long")
    out: dict[str, Any] = {"name": name, "input_schema": tool.get("parameters") or
                           {"type": "object", "properties": {}}}
    if tool.get("description"):
        out["description"] = str(tool["description"])
    return out


def _tool_choice(choice: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICES:
            raise InvalidRequest(f"Invalid value for `tool_choice`: {choice!r}.",
                                 param="tool_choice")
        return {"type": _TOOL_CHOICES[choice]}
    function = choice.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest("Invalid value for `tool_choice`: expected \"auto\", "
                             "\"required\", \"none\" or a function by name.",
                             param="tool_choice")
    return {"type": "tool", "name": function["name"]}


def stop_reason(reason: object) -> str:
    """OpenAI's finish reason for Anthropic's stop reason."""
    return _STOP_REASONS.get(str(reason), "stop")


def usage(raw: object) -> Usage:
    """Anthropic counts the prompt's cached tokens apart; OpenAI's prompt counts them all."""
    if not isinstance(raw, dict):
        return Usage(0, 0)
    read = _count(raw.get("cache_read_input_tokens"))
    prompt = _count(raw.get("input_tokens")) + read + _count(
        raw.get("cache_creation_input_tokens"))
    return Usage(prompt, _count(raw.get("output_tokens")), read)


def _tool_input(value: object) -> object:
    """An upstream's tool input, to be written as arguments: refused past MAX_NESTING levels,
    which no encoder is asked to write."""
    if not nests_within(value):
        raise UpstreamError(f"The upstream sent a tool input nested deeper than {MAX_NESTING} "
                            "levels.")
    return value or {}


def _count(value: object) -> int:
    """What is not a count (a string, a negative number, one past any answer) reads as none."""
    return value if isinstance(value, int) and not isinstance(value, bool) \
        and 0 <= value <= MAX_COUNT else 0


def answer_events(answer: dict[str, Any]) -> list[Event]:
    """The events of a whole Messages answer: its text, its tool calls (their input as
    JSON arguments), the finish reason and the usage. Thinking blocks are not passed on."""
    events: list[Event] = []
    tools = 0
    content = answer.get("content")
    for block in content if isinstance(content, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str) and block["text"]:
            events.append(TextDelta(block["text"]))
        elif kind == "tool_use":
            events.append(ToolCallDelta(tools, str(block.get("id", "")),
                                        str(block.get("name", "")),
                                        orjson.dumps(_tool_input(block.get("input"))).decode()))
            tools += 1
    events.append(Finish(stop_reason(answer.get("stop_reason"))))
    events.append(usage(answer.get("usage")))
    return events


class StreamState:
    """What one Messages stream has said so far: its id and model, which content block is
    which tool call (indices count tool calls of this message from 0), and the usage. One per
    stream: state shared between streams would mix their tool calls."""

    __slots__ = ("_blocks", "_input", "_tools", "_usage", "id", "model")

    def __init__(self) -> None:
        self.id: str | None = None  # known once message_start came
        self.model = ""
        self._tools = 0
        self._blocks: dict[int, int] = {}  # content block index -> tool call index
        self._input: dict[int, bytes | None] = {}  # a tool's input until its JSON streams
        self._usage: dict[str, Any] = {}

    def feed(self, data: bytes) -> list[Event]:
        """The events of one stream event's `data`."""
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return [StreamFailure(UpstreamError("The upstream sent an event that is not JSON."))]
        if not isinstance(event, dict):
            return [StreamFailure(UpstreamError("The upstream sent an event that is not an "
                                                "object."))]
        kind = event.get("type")
        if kind == "content_block_delta":
            return self._delta(event)
        if kind == "content_block_start":
            return self._start(event)
        if kind == "content_block_stop":
            return self._stop(event)
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict):
                self.id = str(message.get("id") or "")
                self.model = str(message.get("model") or "")
                self._count(message.get("usage"))
            return []
        if kind == "message_delta":
            self._count(event.get("usage"))
            delta = event.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            # The answer's last word: the finish reason, then the usage, as OpenAI ends.
            return [Finish(stop_reason(reason)), usage(self._usage)]
        if kind == "error":
            error = event.get("error")
            fields = error if isinstance(error, dict) else {}
            name, text = fields.get("type"), fields.get("message")
            return [StreamFailure(UpstreamError(
                f"The upstream's stream failed ({str(name or 'error')[:100]}): "
                f"{str(text or 'no detail')[:1000]}"))]
        return []  # ping, message_stop, and event types added after this was written

    def _start(self, event: dict[str, Any]) -> list[Event]:
        block = event.get("content_block")
        index = event.get("index")
        if not isinstance(block, dict) or not isinstance(index, int):
            return []
        if block.get("type") == "text":
            text = block.get("text")
            return [TextDelta(text)] if isinstance(text, str) and text else []
        if block.get("type") != "tool_use":
            return []  # thinking, redacted thinking: not passed on
        tool = self._blocks[index] = self._tools
        self._tools += 1
        # The input comes as JSON deltas; a block without any keeps the one it started with.
        start = block.get("input")
        self._input[index] = orjson.dumps(_tool_input(start)) if isinstance(start, dict) \
            else b"{}"
        return [ToolCallDelta(tool, str(block.get("id", "")), str(block.get("name", "")))]

    def _delta(self, event: dict[str, Any]) -> list[Event]:
        delta = event.get("delta")
        if not isinstance(delta, dict):
            return []
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            return [TextDelta(text)] if isinstance(text, str) and text else []
        if kind == "input_json_delta":
            index, piece = event.get("index"), delta.get("partial_json")
            # The first delta often has an empty piece: nothing to say yet.
            if not isinstance(index, int) or index not in self._blocks or \
                    not isinstance(piece, str) or not piece:
                return []
            self._input[index] = None  # the deltas spell the input
            return [ToolCallDelta(self._blocks[index], arguments=piece)]
        return []  # thinking, signature and citation deltas: not passed on

    def _stop(self, event: dict[str, Any]) -> list[Event]:
        index = event.get("index")
        if not isinstance(index, int) or index not in self._blocks:
            return []
        start = self._input.pop(index, None)
        return [ToolCallDelta(self._blocks[index], arguments=start.decode())] if start else []

    def _count(self, raw: object) -> None:
        # message_delta's usage is cumulative and may repeat or complete message_start's.
        if isinstance(raw, dict):
            self._usage.update({k: v for k, v in raw.items() if v is not None})
