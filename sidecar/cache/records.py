"""What the cache keeps: a JSON answer or a recorded stream, with the tenant it belongs to, and
the conversions that let a stream answer a JSON request and the other way round.

Only a stream that ended well is worth keeping (`whole_stream`); a record is checked again
before it is replayed or rebuilt, so a bad one (another version's, or one that slipped in)
is a miss, never an error."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(slots=True)
class Record:
    tenant: str
    kind: str  # "json" | "stream"
    body: bytes = b""  # the JSON answer
    chunks: list[bytes] = field(default_factory=list)  # the stream's chunk payloads

    def encode(self) -> bytes:
        return orjson.dumps({"t": self.tenant, "k": self.kind, "b": self.body.decode(),
                             "c": [c.decode() for c in self.chunks]})

    @classmethod
    def decode(cls, raw: bytes | None) -> Record | None:
        if not raw:
            return None
        try:
            data = orjson.loads(raw)
            return cls(str(data["t"]), str(data["k"]), str(data["b"]).encode(),
                       [str(c).encode() for c in data["c"]])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None  # not ours, or from another version: a miss


def whole_stream(chunks: list[bytes]) -> bool:
    """True when the recorded events are a stream that ended well: each one a JSON object,
    none of them an error event, and every choice given a `finish_reason`."""
    parsed = _objects(chunks)
    if not parsed:
        return False
    if parsed[0].get("type") == "message_start":  # Anthropic's: a stop reason, no error
        return not any(c.get("type") == "error" for c in parsed) and any(
            c.get("type") == "message_delta" and isinstance(c.get("delta"), dict) and
            c["delta"].get("stop_reason") for c in parsed)
    finished: dict[object, bool] = {}
    for chunk in parsed:
        if chunk.get("error") is not None:
            return False  # an upstream's mid-stream error, passed on as an event
        choices = chunk.get("choices")
        if choices is None:
            continue
        if not isinstance(choices, list):
            return False
        for choice in choices:
            if not isinstance(choice, dict):
                return False
            index = choice.get("index", 0)
            if isinstance(index, bool) or not isinstance(index, int):
                return False  # not a stream any client could read
            finished[index] = finished.get(index, False) or bool(choice.get("finish_reason"))
    return bool(finished) and all(finished.values())


def servable(record: Record) -> bool:
    """True when the record can be served: a JSON object, or a whole stream."""
    if record.kind == "stream":
        return whole_stream(record.chunks)
    return record.kind == "json" and len(_objects([record.body])) == 1


def _objects(raw: list[bytes]) -> list[dict[str, Any]]:
    """Each item parsed as a JSON object; empty when any one is not."""
    parsed = []
    for item in raw:
        try:
            value = orjson.loads(item)
        except orjson.JSONDecodeError:
            return []
        if not isinstance(value, dict):
            return []
        parsed.append(value)
    return parsed


def as_json(record: Record) -> bytes | None:
    """The JSON answer, rebuilt from a stream when need be (one text choice only)."""
    if not servable(record):
        return None
    if record.kind == "json":
        return record.body
    chunks = _objects(record.chunks)
    first = chunks[0]
    chat = first.get("object") == "chat.completion.chunk"
    text: list[str] = []
    finish, usage = None, None
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                return None
            if chat:
                delta = choice.get("delta") or {}
                if not isinstance(delta, dict):
                    return None
                if delta.get("tool_calls") or delta.get("function_call"):
                    return None
                piece = delta.get("content") or ""
            else:
                piece = choice.get("text") or ""
            if not isinstance(piece, str):
                return None
            text.append(piece)
            finish = choice.get("finish_reason") or finish
    if chat:
        answer: dict[str, Any] = {
            "index": 0, "message": {"role": "assistant", "content": "".join(text),
                                    "refusal": None},
            "logprobs": None, "finish_reason": finish}
    else:
        answer = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": finish}
    whole = {"id": first.get("id"), "object": "chat.completion" if chat else "text_completion",
             "created": first.get("created"), "model": first.get("model"), "choices": [answer]}
    if first.get("system_fingerprint") is not None:
        whole["system_fingerprint"] = first["system_fingerprint"]
    if usage is not None:
        whole["usage"] = usage
    return orjson.dumps(whole)


def as_chunks(record: Record, include_usage: bool) -> list[bytes] | None:
    """The stream to replay, with a fresh `id` and `created`; built from a JSON answer when
    need be (one text choice only)."""
    if not servable(record):
        return None
    chat_id = ("chatcmpl-" if _is_chat(record) else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if record.kind == "stream":
        if include_usage and not any(b'"usage":{' in c for c in record.chunks):
            return None  # recorded without usage: a miss, so the client gets its usage
        out = []
        for chunk in _objects(record.chunks):
            if chunk.get("usage") and not chunk.get("choices"):
                if include_usage:
                    out.append(orjson.dumps({**chunk, "id": chat_id, "created": created}))
                continue
            chunk = {**chunk, "id": chat_id, "created": created}
            if include_usage:
                chunk.setdefault("usage", None)
            else:
                chunk.pop("usage", None)
            out.append(orjson.dumps(chunk))
        return out
    whole = orjson.loads(record.body)
    choices = whole.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    head: dict[str, Any] = {"id": chat_id, "created": created, "model": whole.get("model")}
    if whole.get("system_fingerprint") is not None:
        head["system_fingerprint"] = whole["system_fingerprint"]
    if include_usage:
        head["usage"] = None
    finish = choice.get("finish_reason")
    if "message" in choice:
        message = choice["message"] or {}
        if not isinstance(message, dict):
            return None
        if message.get("tool_calls") or message.get("function_call"):
            return None
        head["object"] = "chat.completion.chunk"
        deltas = [({"role": "assistant", "content": ""}, None),
                  ({"content": message.get("content") or ""}, None), ({}, finish)]
        out = [orjson.dumps({**head, "choices": [{"index": 0, "delta": d, "logprobs": None,
                                                  "finish_reason": f}]}) for d, f in deltas]
    else:
        head["object"] = "text_completion"
        parts = [(choice.get("text") or "", None), ("", finish)]
        out = [orjson.dumps({**head, "choices": [{"index": 0, "text": t, "logprobs": None,
                                                  "finish_reason": f}]}) for t, f in parts]
    if include_usage:
        if not whole.get("usage"):
            return None
        out.append(orjson.dumps({**head, "choices": [], "usage": whole["usage"]}))
    return out


def _is_chat(record: Record) -> bool:
    if record.kind == "json":
        return b'"chat.completion"' in record.body
    return bool(record.chunks) and b'"chat.completion.chunk"' in record.chunks[0]
