"""The OpenAI request bodies the sidecar understands, validated once at the edge.

Only the fields the sidecar itself reads or must refuse are declared; everything else in the body
travels to the upstream unchanged, because the body forwarded is the client's own object with its
`model` rewritten, not a re-encoding of these types.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import orjson
from msgspec import Meta, Struct

from sidecar.errors import ForbiddenField, InvalidRequest

NonNegative = Annotated[float, Meta(ge=0)]
Probability = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
PositiveInt = Annotated[int, Meta(ge=1)]
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
    n: PositiveInt | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
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


# Keys that would let a client choose where the operator's credentials are sent.
FORBIDDEN_KEYS = frozenset({"api_base", "base_url", "api_key", "api_version"})
# One pass over the raw body: a quoted forbidden key, or an escape that could spell one.
_MIGHT_BE_FORBIDDEN = re.compile(
    rb'"(?:' + b"|".join(re.escape(k.encode()) for k in sorted(FORBIDDEN_KEYS)) + rb')"|\\u'
)


def decode_body(body: bytes) -> dict[str, Any]:
    if not body:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc.msg}.") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    refuse_forbidden_keys(body, payload)
    return payload


def refuse_forbidden_keys(body: bytes, payload: dict[str, Any]) -> None:
    """Refuse a body that names an endpoint or credential field at any depth.

    A substring test on the raw bytes keeps the common case cheap; only a body that might hold
    such a key (or escapes that could spell one) is walked.
    """
    if _MIGHT_BE_FORBIDDEN.search(body) is not None:
        path = _find_forbidden(payload, "")
        if path is not None:
            raise ForbiddenField(
                f"The field `{path}` is not accepted: the sidecar decides where requests go "
                "and which credentials they carry.",
                param=path,
            )


def _find_forbidden(node: object, path: str) -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            if key in FORBIDDEN_KEYS:
                return here
            found = _find_forbidden(value, here)
            if found is not None:
                return found
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found = _find_forbidden(value, f"{path}[{i}]")
            if found is not None:
                return found
    return None


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
