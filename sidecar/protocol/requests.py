"""The OpenAI request bodies the sidecar understands, validated once at the edge.

Only the fields the sidecar itself reads or must refuse are declared; everything else in the body
travels to the upstream unchanged, because the body forwarded is the client's own object with its
`model` rewritten, not a re-encoding of these types.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import orjson
from msgspec import Meta, Struct

from sidecar.errors import ForbiddenField, InvalidRequest

# Ranges nonsense for every provider are refused here; what only a local model cannot take
# (a temperature over 2, penalties outside -2..2) is check_local_ranges' business, since
# upstreams answer for their own ranges.
NonNegative = Annotated[float, Meta(ge=0)]
Probability = Annotated[float, Meta(ge=0, le=1)]
PositiveInt = Annotated[int, Meta(ge=1)]
# OpenAI's own bound on `n`: past it a request asks an upstream (and the token budget's
# estimate) for more answers than any provider gives.
Choices = Annotated[int, Meta(ge=1, le=128)]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
Stop = str | list[str] | None


class ContentPart(Struct):
    type: str


class Message(Struct):
    role: Role
    content: str | list[ContentPart] | None = None


class StreamOptions(Struct):
    include_usage: bool = False


class Sampling(Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    temperature: NonNegative | None = None
    top_p: Probability | None = None
    n: Choices | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: Stop = None


class ChatCompletionRequest(Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None


def _check_text_or_tokens(value: str | list[Any], name: str) -> None:
    """A string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(value, str):
        return
    if not value:
        raise InvalidRequest(f"Invalid value for `{name}`: must not be empty.", param=name)
    if all(isinstance(v, str) for v in value):
        return
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return
    if all(
        isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        for v in value
    ):
        return
    raise InvalidRequest(
        f"Invalid value for `{name}`: expected a string, a list of strings, a list of token ids "
        "or a list of lists of token ids.",
        param=name,
    )


class CompletionRequest(Sampling, kw_only=True):
    prompt: str | list[Any]

    def __post_init__(self) -> None:
        _check_text_or_tokens(self.prompt, "prompt")


class EmbeddingRequest(Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1)]
    input: str | list[Any]

    def __post_init__(self) -> None:
        _check_text_or_tokens(self.input, "input")


# Keys that would let a client choose where the operator's credentials are sent, compared
# without case or separators: `API_BASE`, `apiBase`, `baseURL`, `api-key` are the same keys.
# Anthropic's side adds its key header's name, and the MCP servers (and their URLs) that
# the upstream would call on the operator's account.
FORBIDDEN_KEYS = frozenset({"api_base", "base_url", "api_key", "api_version", "x_api_key",
                            "auth_token", "mcp_servers", "server_url"})
_SEPARATORS = str.maketrans("", "", "_-. ")
_FORBIDDEN_FOLDED = frozenset(k.translate(_SEPARATORS) for k in FORBIDDEN_KEYS)
# Keys most bodies are made of, known harmless: the walk skips folding them.
_COMMON_KEYS = frozenset({
    "model", "messages", "role", "content", "type", "text", "name", "stream", "stream_options",
    "include_usage", "temperature", "top_p", "max_tokens", "max_completion_tokens", "n",
    "stop", "seed", "presence_penalty", "frequency_penalty", "user", "tools", "tool_choice",
    "tool_calls", "tool_call_id", "function", "arguments", "parameters", "description", "id",
    "prompt", "input", "response_format", "image_url", "url", "logprobs", "metadata",
    "system", "stop_sequences", "input_schema", "tool_use_id", "source", "media_type", "data",
})
MAX_DEPTH = 64
# A key ends with a quote and a colon; with whitespace between them, or a key ending in a
# backslash, counting them is not exact (see _may_repeat_keys).
_SPACED_COLON = re.compile(rb'"[ \t\r\n]+:')


def decode_body(body: bytes) -> dict[str, Any]:
    """The request's JSON object, refused (400) when it nests deeper than MAX_DEPTH, names a
    forbidden key, or repeats a key in one object (orjson would keep the last value, while
    the bytes forwarded carry both)."""
    if not body:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth" in exc.msg or "recursion" in exc.msg:
            raise _too_deep() from None
        raise InvalidRequest(f"The request body is not valid JSON: {exc.msg}.") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    keys = _walk(payload, 1)
    if keys < 0:
        path = _find_forbidden(payload, "")
        raise ForbiddenField(
            f"The field `{path}` is not accepted: the sidecar decides where requests go "
            "and which credentials they carry.",
            param=path,
        )
    if _may_repeat_keys(body, keys):
        _refuse_repeated_keys(body)
    return payload


def _too_deep() -> InvalidRequest:
    return InvalidRequest(f"The request body nests deeper than {MAX_DEPTH} levels.",
                          code="too_deeply_nested")


def _walk(node: dict[str, Any] | list[Any], depth: int) -> int:
    """The number of keys at every depth, or -1 when one is forbidden; raises past
    MAX_DEPTH (so no later walk or encoder recurses further than this)."""
    if depth > MAX_DEPTH:
        raise _too_deep()
    count = 0
    if type(node) is dict:
        count = len(node)
        for key, value in node.items():
            if key not in _COMMON_KEYS and key.lower().translate(_SEPARATORS) in \
                    _FORBIDDEN_FOLDED:
                return -1
            if type(value) is dict or type(value) is list:
                inner = _walk(value, depth + 1)
                if inner < 0:
                    return -1
                count += inner
        return count
    for value in node:
        if type(value) is dict or type(value) is list:
            inner = _walk(value, depth + 1)
            if inner < 0:
                return -1
            count += inner
    return count


def _may_repeat_keys(body: bytes, keys: int) -> bool:
    """False when the raw body provably has no more keys than the parsed object.

    Outside strings, a quote followed by a colon ends a key; inside one, every quote is
    escaped. So with no whitespace before a colon and no key ending in a backslash (no two
    backslashes before a `":`), the `":` not preceded by a backslash are exactly the keys
    written: more than were parsed means a repeat. Anything unusual takes the exact path.
    """
    written = body.count(b'":') - body.count(b'\\":')
    if written != keys or b'\\\\":' in body:
        return True
    # A quote followed by whitespace is rare in compact JSON; only then is the pattern run.
    spaced = b'" ' in body or b'"\n' in body or b'"\t' in body or b'"\r' in body
    return spaced and _SPACED_COLON.search(body) is not None


def _refuse_repeated_keys(body: bytes) -> None:
    """The exact check, for the rare body the count cannot clear: parse again keeping pairs."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen = dict(items)
        if len(seen) != len(items):
            names = [k for k, _ in items]
            repeated = next(k for k in names if names.count(k) > 1)
            raise InvalidRequest(
                f"The field `{repeated}` appears more than once in one object; send it once.",
                param=repeated, code="duplicate_field")
        return seen

    json.loads(body, object_pairs_hook=pairs)


def _find_forbidden(node: object, path: str) -> str:
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            if key.lower().translate(_SEPARATORS) in _FORBIDDEN_FOLDED:
                return here
            found = _find_forbidden(value, here)
            if found:
                return found
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found = _find_forbidden(value, f"{path}[{i}]")
            if found:
                return found
    return ""


def check_local_ranges(parsed: Sampling) -> None:
    """Refuse what a model run here cannot take, though an upstream might: a temperature
    over 2, presence or frequency penalties outside -2..2 (OpenAI's documented ranges)."""
    if parsed.temperature is not None and parsed.temperature > 2:
        raise InvalidRequest(
            f"Invalid value for `temperature`: {parsed.temperature:g} is over 2, the most a "
            "local model takes.", param="temperature")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(parsed, name)
        if value is not None and not -2 <= value <= 2:
            raise InvalidRequest(
                f"Invalid value for `{name}`: {value:g} is outside -2..2.", param=name)


T = TypeVar("T")


def validate(payload: dict[str, Any], schema: type[T]) -> T:
    try:
        return msgspec.convert(payload, schema)
    except msgspec.ValidationError as exc:
        message, param = _explain(str(exc))
        raise InvalidRequest(message, param=param) from None


def _explain(text: str) -> tuple[str, str | None]:
    # msgspec says "Expected `int`, got `str` - at `$.max_tokens`" or "Object missing required
    # field `role` - at `$.messages[0]`". Turn that into the OpenAI `param` and a sentence.
    message, sep, where = text.rpartition(" - at ")
    if not sep:
        message, where = text, ""
    param = where.strip("`").removeprefix("$").lstrip(".")
    missing = _MISSING.match(message)
    if missing:
        param = f"{param}.{missing[1]}" if param else missing[1]
        return f"Missing required parameter: `{param}`.", param
    if param:
        return f"Invalid value for `{param}`: {message}.", param
    return f"{message}.", None


_MISSING = re.compile(r"Object missing required field `([^`]+)`")
