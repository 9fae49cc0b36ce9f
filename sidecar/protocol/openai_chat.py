"""OpenAI's chat protocol to and from the internal form (sidecar/protocol/chat.py): a request
body to a `ChatRequest` and back, stream chunks to events, and events to chunks and to a whole
answer. Pure: no I/O. Where OpenAI is spoken on both sides the bytes pass through instead."""

from __future__ import annotations

from typing import Any, TypeGuard

import orjson

from sidecar.errors import InvalidRequest, UpstreamError
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
)

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "tool": "tool"}


def request_from_openai(payload: dict[str, Any]) -> ChatRequest:
    """A validated chat completions body (sidecar/protocol/requests.py) as the internal form."""
    limit = payload.get("max_completion_tokens") or payload.get("max_tokens")
    stop = payload.get("stop")
    options = payload.get("stream_options")
    top_k = payload.get("top_k")
    # Not in the validated schema (a body passed through carries them as they are): read
    # here, so checked here.
    tools = _list_field(payload.get("tools"), "tools")
    choice = payload.get("tool_choice")
    if choice is not None and not isinstance(choice, str | dict):
        raise InvalidRequest("Invalid value for `tool_choice`: expected a string or an object.",
                             param="tool_choice")
    request = ChatRequest(
        model=str(payload["model"]),
        messages=[_message(m, i) for i, m in enumerate(payload.get("messages") or ())],
        max_tokens=int(limit) if limit is not None else None,
        temperature=_number(payload.get("temperature")),
        top_p=_number(payload.get("top_p")),
        top_k=top_k if isinstance(top_k, int) and not isinstance(top_k, bool) else None,
        presence_penalty=_number(payload.get("presence_penalty")),
        frequency_penalty=_number(payload.get("frequency_penalty")),
        seed=payload.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        stream=bool(payload.get("stream")),
        include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
        user=payload.get("user"),
        tool_choice=choice,
        parallel_tool_calls=_flag(payload.get("parallel_tool_calls")),
    )
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest("Invalid value for `tools`: each tool needs a function name.",
                                 param="tools")
        request.tools.append(function)
    return request


def request_to_openai(request: ChatRequest) -> dict[str, Any]:
    """The internal form as a chat completions body, for an OpenAI-compatible target."""
    body: dict[str, Any] = {"model": request.model,
                            "messages": [_message_out(m) for m in request.messages]}
    for name in ("max_tokens", "temperature", "top_p", "presence_penalty",
                 "frequency_penalty", "seed", "user", "tool_choice", "parallel_tool_calls"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.stop:
        body["stop"] = list(request.stop)
    if request.tools:
        body["tools"] = [{"type": "function", "function": t} for t in request.tools]
    if request.stream:
        body["stream"] = True
        if request.include_usage:
            body["stream_options"] = {"include_usage": True}
    return body


def _message(raw: dict[str, Any], i: int) -> ChatMessage:
    content = raw.get("content")
    parts: list[str | ImagePart] = []
    if isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
                continue
            if kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if isinstance(url, str) and url:
                    detail = image.get("detail") if isinstance(image, dict) else None
                    parts.append(ImagePart(url, detail if isinstance(detail, str) else None))
                    continue
            raise InvalidRequest(
                f"This model reads text and images only; messages[{i}].content[{j}] is "
                f"{kind or 'not a content part'!r}" + (" without a URL." if kind else "."),
                param=f"messages[{i}].content[{j}]", code="unsupported_content")
        content = "\n".join(p for p in parts if isinstance(p, str))
    message = ChatMessage(_ROLES.get(str(raw.get("role")), str(raw.get("role"))),
                          content if isinstance(content, str) else "")
    if any(isinstance(p, ImagePart) for p in parts):
        message.parts = parts
    for call in _list_field(raw.get("tool_calls"), f"messages[{i}].tool_calls"):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            message.tool_calls.append({"id": str(call.get("id", "")),
                                       "name": str(function.get("name", "")),
                                       "arguments": str(function.get("arguments", ""))})
    if isinstance(raw.get("tool_call_id"), str):
        message.tool_call_id = raw["tool_call_id"]
    return message


def _message_out(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.parts:
        out["content"] = [
            {"type": "text", "text": p} if isinstance(p, str) else
            {"type": "image_url", "image_url": {"url": p.url} | (
                {"detail": p.detail} if p.detail is not None else {})}
            for p in message.parts]
    if message.tool_calls:
        out["tool_calls"] = [{"id": c["id"], "type": "function",
                              "function": {"name": c["name"], "arguments": c["arguments"]}}
                             for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _list_field(value: object, name: str) -> list[Any]:
    """A list field as a list (absent: empty), or its refusal naming it."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest(f"Invalid value for `{name}`: expected a list.", param=name)
    return value


def _flag(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def events_from_chunk(data: bytes) -> list[Event]:
    """The events in one stream chunk's `data` (the first choice's; `n` > 1 does not
    translate)."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return [StreamFailure(UpstreamError("The upstream sent an event that is not JSON."))]
    if not isinstance(chunk, dict):
        return [StreamFailure(UpstreamError("The upstream sent an event that is not an "
                                            "object."))]
    events: list[Event] = []
    error = chunk.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else None
        return [StreamFailure(UpstreamError(str(message or "The upstream's stream failed.")))]
    for choice in _list(chunk.get("choices")):
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        text = delta.get("content")
        if isinstance(text, str) and text:
            events.append(TextDelta(text))
        for call in _list(delta.get("tool_calls")):
            if not isinstance(call, dict):
                continue
            function = call.get("function")
            if not isinstance(function, dict):
                function = {}
            events.append(ToolCallDelta(_count(call.get("index")), _text(call.get("id")),
                                        _text(function.get("name")),
                                        _text(function.get("arguments")) or ""))
        if choice.get("finish_reason"):
            events.append(Finish(str(choice["finish_reason"])))
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        events.append(usage_from_json(usage))
    return events


def events_from_answer(answer: dict[str, Any]) -> list[Event]:
    """The events of a whole chat answer (its first choice): text, tool calls, the finish
    reason, usage."""
    events: list[Event] = []
    choices = answer.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    message = choice.get("message") if isinstance(choice, dict) else None
    if isinstance(message, dict):
        text = message.get("content")
        if isinstance(text, str) and text:
            events.append(TextDelta(text))
        for i, call in enumerate(_list(message.get("tool_calls"))):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                events.append(ToolCallDelta(i, str(call.get("id", "")),
                                            str(function.get("name", "")),
                                            str(function.get("arguments") or "")))
    if isinstance(choice, dict) and choice.get("finish_reason"):
        events.append(Finish(str(choice["finish_reason"])))
    usage = answer.get("usage")
    if isinstance(usage, dict):
        events.append(usage_from_json(usage))
    return events


class ChunkWriter:
    """OpenAI's stream chunks for one answer, chat or legacy completions."""

    __slots__ = ("chat", "head")

    def __init__(self, head: dict[str, Any], chat: bool) -> None:
        self.head = head  # id, object, created, model, system_fingerprint (, usage: None)
        self.chat = chat

    def role(self) -> bytes:
        """The first chunk of a chat stream, which names the role."""
        return self._delta({"role": "assistant", "content": "", "refusal": None})

    def event(self, event: Event) -> bytes:
        if isinstance(event, TextDelta):
            if self.chat:
                return self._delta({"content": event.text})
            return self._choice({"index": 0, "text": event.text, "logprobs": None,
                                 "finish_reason": None})
        if isinstance(event, Finish):
            if self.chat:
                return self._delta({}, event.reason)
            return self._choice({"index": 0, "text": "", "logprobs": None,
                                 "finish_reason": event.reason})
        if isinstance(event, Usage):
            return orjson.dumps({**self.head, "choices": [], "usage": usage_json(event)})
        if isinstance(event, ToolCallDelta):
            call: dict[str, Any] = {"index": event.index,
                                    "function": {"arguments": event.arguments}}
            if event.id is not None:
                call["id"], call["type"] = event.id, "function"
            if event.name is not None:
                call["function"]["name"] = event.name
            return self._delta({"tool_calls": [call]})
        return orjson.dumps(event.error.body())

    def _delta(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return self._choice({"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish})

    def _choice(self, choice: dict[str, Any]) -> bytes:
        return orjson.dumps({**self.head, "choices": [choice]})


def answer_json(head: dict[str, Any], chat: bool, events: list[Event]) -> bytes:
    """A whole (non-streamed) answer from the events of one generation."""
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    finish = next((e.reason for e in reversed(events) if isinstance(e, Finish)), "stop")
    usage = next((e for e in reversed(events) if isinstance(e, Usage)), None)
    if chat:
        calls = _tool_calls(events)
        # With tool calls and no text, OpenAI says `content: null`.
        message: dict[str, Any] = {
            "role": "assistant", "content": text if text or not calls else None,
            "refusal": None}
        if calls:
            message["tool_calls"] = calls
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None,
                                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    body = {**head, "choices": [choice]}
    if usage is not None:
        body["usage"] = usage_json(usage)
    return orjson.dumps(body)


def _tool_calls(events: list[Event]) -> list[dict[str, Any]]:
    """The tool calls the deltas spell, in the order of their indices."""
    calls: dict[int, dict[str, Any]] = {}
    for event in events:
        if not isinstance(event, ToolCallDelta):
            continue
        call = calls.setdefault(event.index, {"id": "", "type": "function",
                                              "function": {"name": "", "arguments": ""}})
        if event.id is not None:
            call["id"] = event.id
        if event.name is not None:
            call["function"]["name"] = event.name
        call["function"]["arguments"] += event.arguments
    return [calls[index] for index in sorted(calls)]


def usage_json(usage: Usage) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt_tokens": usage.prompt_tokens,
                            "completion_tokens": usage.completion_tokens,
                            "total_tokens": usage.total_tokens}
    if usage.cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return body


def usage_from_json(usage: dict[str, Any]) -> Usage:
    """An upstream's usage: what is not a count (a string, a negative number, one past any
    answer) reads as none."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")),
                 cached if _is_count(cached) else None)


# An upstream's JSON is read for what it should hold; anything else counts as absent, so that
# a malformed answer never raises in the middle of a translation.
def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _count(value: object) -> int:
    return value if _is_count(value) else 0
