"""The `usage` of an OpenAI answer or stream chunk, read on every request (the token budget,
the log line and the metrics need it), so read cheaply: decoded straight into a typed struct,
which skips the rest of the answer without building it, and from the usage key on when the
answer is long."""

from __future__ import annotations

from typing import Annotated, TypeGuard

import msgspec
import orjson

from sidecar.protocol.chat import MAX_COUNT

Usage = tuple[int, int, int, int]
# Past this many bytes, decoding from the last "usage" key on beats skipping the whole answer.
_WHOLE_BELOW = 2048


# A count below zero is refused: it would give a tenant's token budget back more than the
# request took; so is one past any answer (MAX_COUNT), which would drain the budget.
_Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]


class _Details(msgspec.Struct, gc=False):
    cached_tokens: _Count = -1  # the default says "not said"


class _Usage(msgspec.Struct, gc=False):
    total_tokens: _Count
    prompt_tokens: _Count = 0
    completion_tokens: _Count = 0
    prompt_tokens_details: _Details | None = None


class _Answer(msgspec.Struct, gc=False):
    usage: _Usage | None = None


_decode = msgspec.json.Decoder(_Answer).decode


def usage_of(body: bytes) -> Usage | None:
    """Prompt, completion and total tokens, and the prompt tokens read from the provider's
    cache (-1 when the answer does not say)."""
    try:
        if len(body) < _WHOLE_BELOW:
            usage = _decode(body).usage
        else:
            # Usage comes last in most answers. Where the last "usage" key is nested deeper,
            # the part from it on has more closing braces than opening ones and is refused.
            at = body.rfind(b'"usage"')
            if at < 0:
                return None
            usage = _decode(b"{" + body[at:]).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _loosely(body)
    if usage is None:
        return None
    details = usage.prompt_tokens_details
    return (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens,
            -1 if details is None else details.cached_tokens)


def _loosely(body: bytes) -> Usage | None:
    """The usage of an answer the typed decode refused (a field of another type, a nested
    usage last): whatever parses as JSON, with what is not a count read as none."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if not _count(total):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return (prompt if _count(prompt) else 0, completion if _count(completion) else 0, total,
            cached if _count(cached) else -1)


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT
