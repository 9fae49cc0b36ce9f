"""OpenAI's Responses API as a front door speaks it: a client's Responses request read into the
internal form (sidecar/protocol/chat.py), and the events of an answer written as a Response
object or as the Responses stream's events. Pure, no I/O."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from sidecar.errors import InvalidRequest
from sidecar.protocol.chat import (
    ChatMessage,
    ChatRequest,
    Event,
    Finish,
    ImagePart,
    TextDelta,
    ToolCallDelta,
    Usage,
)

MAX_ITEMS = 4096  # input items a request may carry

# Fields that need state kept by the target between requests: a target that keeps none
# would answer without the context the client counts on, so they are refused by name.
STATEFUL = ("previous_response_id", "conversation")


def refuse_stateful(payload: dict[str, Any]) -> None:
    for name in STATEFUL:
        if payload.get(name) is not None:
            raise InvalidRequest(
                f"This model's target keeps no conversation state, so `{name}` cannot be "
                "honoured; send the whole conversation as `input` instead.",
                param=name, code="unsupported_parameter")
    if payload.get("store") is True:
        raise InvalidRequest("This model's target keeps no responses, so `store: true` cannot "
                             "be honoured; send `store: false`.", param="store",
                             code="unsupported_parameter")


def request_from_responses(payload: dict[str, Any]) -> ChatRequest:
    """A Responses request in the internal form; what it cannot carry is refused by name."""
    refuse_stateful(payload)
    fmt = (payload.get("text") or {}).get("format") if isinstance(payload.get("text"),
                                                                   dict) else None
    if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
        raise InvalidRequest("Structured output (`text.format`) is not supported for this "
                             "model's target.", param="text.format",
                             code="unsupported_parameter")
    messages: list[ChatMessage] = []
    instructions = payload.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append(ChatMessage("system", instructions))
    given = payload.get("input")
    if isinstance(given, str):
        messages.append(ChatMessage("user", given))
    elif isinstance(given, list):
        if len(given) > MAX_ITEMS:
            raise InvalidRequest(f"`input` has more than {MAX_ITEMS} items.", param="input")
        for i, item in enumerate(given):
            _item(item, i, messages)
    else:
        raise InvalidRequest("`input` must be a string or a list of items.", param="input")
    request = ChatRequest(model=str(payload["model"]), messages=messages)
    request.max_tokens = _int(payload.get("max_output_tokens"), "max_output_tokens")
    request.temperature = _float(payload.get("temperature"), "temperature")
    request.top_p = _float(payload.get("top_p"), "top_p")
    request.stream = payload.get("stream") is True
    request.include_usage = request.stream
    tools = payload.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("`tools` must be a list of tools.", param="tools")
    request.tools = [_tool(t, i) for i, t in enumerate(tools or ())]
    request.tool_choice = _tool_choice(payload.get("tool_choice"))
    if isinstance(payload.get("parallel_tool_calls"), bool):
        request.parallel_tool_calls = payload["parallel_tool_calls"]
    return request


def _item(item: object, i: int, messages: list[ChatMessage]) -> None:
    if not isinstance(item, dict):
        raise InvalidRequest(f"`input[{i}]` must be an object.", param=f"input[{i}]")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise InvalidRequest(f"`input[{i}].role` is not a role.", param=f"input[{i}].role")
        text, parts = _content(item.get("content"), i)
        messages.append(ChatMessage("system" if role == "developer" else str(role), text,
                                    parts=parts))
    elif kind == "function_call":
        call = {"id": str(item.get("call_id", "")), "name": str(item.get("name", "")),
                "arguments": str(item.get("arguments", ""))}
        last = messages[-1] if messages else None
        if last is not None and last.role == "assistant" and last.tool_calls:
            last.tool_calls.append(call)  # parallel calls make one assistant turn
        else:
            messages.append(ChatMessage("assistant", "", tool_calls=[call]))
    elif kind == "function_call_output":
        output = item.get("output")
        messages.append(ChatMessage("tool", output if isinstance(output, str)
                                    else orjson.dumps(output).decode(),
                                    tool_call_id=str(item.get("call_id", ""))))
    else:
        raise InvalidRequest(f"`input[{i}]` is of a type (`{str(kind)[:40]}`) this model's "
                             "target does not support.", param=f"input[{i}].type")


def _content(content: object, i: int) -> tuple[str, list[str | ImagePart]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise InvalidRequest(f"`input[{i}].content` must be a string or a list of parts.",
                             param=f"input[{i}].content")
    parts: list[str | ImagePart] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append(ImagePart(part["image_url"], part.get("detail")))
        else:
            raise InvalidRequest(f"`input[{i}].content` has a part this model's target does "
                                 "not support.", param=f"input[{i}].content")
    text = "\n".join(p for p in parts if isinstance(p, str))
    return text, parts if any(isinstance(p, ImagePart) for p in parts) else []


def _tool(tool: object, i: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function" or \
            not isinstance(tool.get("name"), str):
        raise InvalidRequest(f"`tools[{i}]`: only function tools are supported for this "
                             "model's target.", param=f"tools[{i}]")
    function: dict[str, Any] = {"name": tool["name"]}
    for name in ("description", "parameters", "strict"):
        if tool.get(name) is not None:
            function[name] = tool[name]
    return function


def _tool_choice(choice: object) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": str(choice.get("name", ""))}}
    raise InvalidRequest("`tool_choice` must be a string or a function.", param="tool_choice")


def _int(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"`{name}` must be a positive integer.", param=name)
    return value


def _float(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"`{name}` must be a number.", param=name)
    return float(value)


@dataclass
class _Output:
    """One output item as it is being written: a message or a function call."""

    item_id: str
    kind: str  # "message" | "function_call"
    text: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""


class ResponseWriter:
    """The events of one answer as a Response (`response_json`) or, event by event, as the
    Responses stream's events (JSON payloads, each with its `type`)."""

    def __init__(self, model: str, response_id: str | None = None) -> None:
        self.id = response_id or f"resp_{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())
        self._seq = 0
        self._outputs: list[_Output] = []
        self._calls: dict[int, int] = {}  # a tool call's index → its output's position
        self._finish: str | None = None
        self._usage: Usage | None = None

    def start(self) -> list[bytes]:
        return [self._out("response.created", response=self.response("in_progress")),
                self._out("response.in_progress", response=self.response("in_progress"))]

    def event(self, event: Event) -> list[bytes]:
        if isinstance(event, TextDelta):
            return self._text(event.text) if event.text else []
        if isinstance(event, ToolCallDelta):
            return self._call(event)
        if isinstance(event, Finish):
            self._finish = event.reason
        elif isinstance(event, Usage):
            self._usage = event
        return []

    def end(self) -> list[bytes]:
        """The open items closed, then `response.completed` (or `.incomplete`)."""
        out = [data for position in range(len(self._outputs))
               for data in self._close(position)]
        status = self.status()
        kind = "response.completed" if status == "completed" else "response.incomplete"
        out.append(self._out(kind, response=self.response(status)))
        return out

    def status(self) -> str:
        return "incomplete" if self._finish == "length" else "completed"

    def response_json(self, events: list[Event]) -> bytes:
        for event in events:
            self.event(event)
        return orjson.dumps(self.response(self.status()))

    def response(self, status: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": status, "model": self.model, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete" else None,
            "output": [self._item(o, "completed") for o in self._outputs]
            if status != "in_progress" else [],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": self._usage_json() if status != "in_progress" else None,
        }
        return body

    def _usage_json(self) -> dict[str, Any] | None:
        usage = self._usage
        if usage is None:
            return None
        return {"input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": usage.cached_tokens or 0},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.prompt_tokens + usage.completion_tokens}

    def _text(self, text: str) -> list[bytes]:
        out: list[bytes] = []
        current = self._outputs[-1] if self._outputs else None
        if current is None or current.kind != "message":
            current = _Output(f"msg_{uuid.uuid4().hex}", "message")
            self._outputs.append(current)
            position = len(self._outputs) - 1
            out.append(self._out("response.output_item.added", output_index=position,
                                 item=self._item(current, "in_progress")))
            out.append(self._out("response.content_part.added", item_id=current.item_id,
                                 output_index=position, content_index=0,
                                 part={"type": "output_text", "text": "", "annotations": []}))
        current.text.append(text)
        out.append(self._out("response.output_text.delta", item_id=current.item_id,
                             output_index=len(self._outputs) - 1, content_index=0,
                             delta=text))
        return out

    def _call(self, delta: ToolCallDelta) -> list[bytes]:
        out: list[bytes] = []
        position = self._calls.get(delta.index)
        if position is None:
            call = _Output(f"fc_{uuid.uuid4().hex}", "function_call",
                           call_id=delta.id or f"call_{uuid.uuid4().hex[:24]}",
                           name=delta.name or "")
            self._outputs.append(call)
            position = self._calls[delta.index] = len(self._outputs) - 1
            out.append(self._out("response.output_item.added", output_index=position,
                                 item=self._item(call, "in_progress")))
        call = self._outputs[position]
        if delta.arguments:
            call.text.append(delta.arguments)
            out.append(self._out("response.function_call_arguments.delta",
                                 item_id=call.item_id, output_index=position,
                                 delta=delta.arguments))
        return out

    def _close(self, position: int) -> list[bytes]:
        item = self._outputs[position]
        done = self._item(item, "completed")
        if item.kind == "message":
            text = "".join(item.text)
            part = {"type": "output_text", "text": text, "annotations": []}
            return [self._out("response.output_text.done", item_id=item.item_id,
                              output_index=position, content_index=0, text=text),
                    self._out("response.content_part.done", item_id=item.item_id,
                              output_index=position, content_index=0, part=part),
                    self._out("response.output_item.done", output_index=position, item=done)]
        return [self._out("response.function_call_arguments.done", item_id=item.item_id,
                          output_index=position, arguments="".join(item.text)),
                self._out("response.output_item.done", output_index=position, item=done)]

    @staticmethod
    def _item(item: _Output, status: str) -> dict[str, Any]:
        text = "".join(item.text) if status == "completed" else ""
        if item.kind == "message":
            content = [{"type": "output_text", "text": text, "annotations": []}] \
                if status == "completed" else []
            return {"id": item.item_id, "type": "message", "status": status,
                    "role": "assistant", "content": content}
        return {"id": item.item_id, "type": "function_call", "status": status,
                "call_id": item.call_id, "name": item.name, "arguments": text}

    def _out(self, kind: str, **fields: Any) -> bytes:
        self._seq += 1
        return orjson.dumps({"type": kind, "sequence_number": self._seq, **fields})
