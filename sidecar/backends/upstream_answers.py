"""Reading what an upstream says: a whole answer to translate (a JSON object, or its 502), and,
when it refuses, how long it asks us to wait (bounded, and parsed defensively) and the fields
of its error object, OpenAI's or Anthropic's."""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from typing import Any

import orjson

from sidecar.errors import UpstreamError

# An upstream asking for a longer wait is passed on as asking for this; the router rests a
# target at most `routing.max_rest_s` whatever it asks.
RETRY_AFTER_CAP_S = 86_400.0
# Upstream words quoted in a short field (an error's type, code or param, a Content-Type).
FIELD_CHARS = 100


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date), at
    most a day; None when neither says a number of seconds we can use (junk, negative, not
    finite), so the caller's own backoff applies."""
    value = headers.get("retry-after-ms")
    if value is not None:
        milliseconds = _seconds(value)
        if milliseconds is not None:
            return min(milliseconds / 1000.0, RETRY_AFTER_CAP_S)
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is None:
        try:
            seconds = max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError, IndexError, OverflowError, OSError):
            return None
    return min(seconds, RETRY_AFTER_CAP_S)


def _seconds(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def answer_object(raw: bytes, target: str) -> dict[str, Any]:
    """A whole answer to translate: the JSON object it must be, or the target's 502."""
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"The target `{target}` answered with something that is not "
                            "JSON.") from None
    if not isinstance(answer, dict):
        raise UpstreamError(f"The target `{target}` answered with something that is not an "
                            "object.")
    return answer


def error_fields(raw: bytes) -> dict[str, Any]:
    """The `error` object of an error body, OpenAI's or Anthropic's (both nest it there)."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict):
            return error
        if isinstance(error, str):
            return {"message": error}
    return {}


def default_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status == 404:
        return "not_found_error"
    return "invalid_request_error"


def field(value: str | None) -> str | None:
    return value if value is None else value[:FIELD_CHARS]
