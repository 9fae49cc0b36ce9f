"""Scrubbing what an upstream wrote before it reaches a client, a log or the admin API.

An upstream that echoes the request it got (a debugging proxy, a hostile or broken server)
would otherwise hand the operator's API key, or a configured header's value, to whoever reads
its error. Known secrets are removed wherever they appear; anything shaped like a credential
(`Bearer ...`, `sk-...`) is removed from error texts too, whoever's it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import orjson

REDACTED = "[redacted]"
_REDACTED_BYTES = REDACTED.encode()
# Configured values shorter than this are not scrubbed: a header such as `X-Beta: on` would
# otherwise garble every message, and a value that short guards nothing anyway.
MIN_SECRET_CHARS = 8
# Stops at quotes and backslashes, so a match inside a JSON string never eats its end.
_SHAPES = r"""(?i)(\bbearer\s+)[^\s"'\\,;]+|\bsk-[A-Za-z0-9_\-]{4,}"""
_SHAPES_TEXT = re.compile(_SHAPES)
_SHAPES_BYTES = re.compile(_SHAPES.encode())


def secrets_of(values: Iterable[str | None]) -> tuple[str, ...]:
    """The values worth scrubbing, longest first, so a secret that contains another is
    removed whole."""
    found = {value for value in values if value and len(value) >= MIN_SECRET_CHARS}
    return tuple(sorted(found, key=len, reverse=True))


def byte_forms(secrets: Sequence[str]) -> tuple[bytes, ...]:
    """Each secret as it may appear in JSON bytes: as is, escaped, and with `\\/` escapes."""
    forms: list[bytes] = []
    for secret in secrets:
        escaped = orjson.dumps(secret)[1:-1]
        for form in (secret.encode(), escaped, escaped.replace(b"/", b"\\/")):
            if form not in forms:
                forms.append(form)
    return tuple(forms)


def scrub(text: str, secrets: Sequence[str] = ()) -> str:
    """`text` without the given secrets and without anything shaped like a credential."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _SHAPES_TEXT.sub(_keep_scheme_text, text)


def scrub_bytes(data: bytes, secrets: Sequence[bytes], *, shapes: bool) -> bytes:
    """JSON bytes without the given secrets (see `byte_forms`) and, with `shapes`, without
    credential-shaped strings. The result is still JSON: the replacement needs no escape."""
    for secret in secrets:
        if secret in data:
            data = data.replace(secret, _REDACTED_BYTES)
    return _SHAPES_BYTES.sub(_keep_scheme_bytes, data) if shapes else data


def _keep_scheme_text(match: re.Match[str]) -> str:
    return (match[1] or "") + REDACTED


def _keep_scheme_bytes(match: re.Match[bytes]) -> bytes:
    return (match[1] or b"") + _REDACTED_BYTES
