"""Scrubbing an upstream's words: known secrets wherever they appear, credential shapes in
error texts, and JSON that stays JSON."""

from __future__ import annotations

import orjson
import pytest

from sidecar.security.scrub import REDACTED, byte_forms, scrub, scrub_bytes, secrets_of

KEY = "sk-proj-Abc123/def+456=="
HEADER = "org-header-value-789"


def test_short_or_missing_values_are_not_secrets() -> None:
    assert secrets_of([None, "", "on", "1234567", HEADER]) == (HEADER,)


def test_longer_secret_is_removed_whole_before_one_it_contains() -> None:
    secrets = secrets_of(["abcdefgh", "abcdefgh-and-more"])
    assert scrub("x abcdefgh-and-more y", secrets) == f"x {REDACTED} y"


def test_known_secret_is_removed_wherever_it_appears() -> None:
    text = f"you sent Authorization: Bearer {KEY}, X-Org: {HEADER}; key={KEY}"
    cleaned = scrub(text, secrets_of([KEY, HEADER]))
    assert KEY not in cleaned and HEADER not in cleaned
    assert cleaned.startswith("you sent Authorization: Bearer ")


@pytest.mark.parametrize("text", [
    "invalid token Bearer abc.def.ghi from you",
    "BEARER   eyJhbGciOi",
    "the key sk-live-0123456789abcdef is revoked",
])
def test_credential_shapes_are_removed_without_knowing_them(text: str) -> None:
    cleaned = scrub(text)
    assert REDACTED in cleaned
    assert "abc.def" not in cleaned and "eyJ" not in cleaned and "0123456789" not in cleaned


def test_plain_words_are_left_alone() -> None:
    text = "rate limit exceeded for model gpt-4o-mini (ask-me later; risk-free)"
    assert scrub(text, secrets_of([HEADER])) == text


def test_secret_in_json_bytes_is_removed_in_every_escaping() -> None:
    forms = byte_forms(secrets_of([KEY]))
    for event in (orjson.dumps({"error": {"message": f"bad {KEY}"}}),
                  b'{"error":{"message":"bad ' + KEY.replace("/", "\\/").encode() + b'"}}'):
        cleaned = scrub_bytes(event, forms, shapes=False)
        assert b"Abc123" not in cleaned
        assert orjson.loads(cleaned)["error"]["message"] == f"bad {REDACTED}"


def test_shapes_in_json_bytes_keep_the_json_valid() -> None:
    event = orjson.dumps({"error": {"message": "got \"Bearer xyz123\" and sk-abcdef0123"}})
    cleaned = scrub_bytes(event, (), shapes=True)
    assert orjson.loads(cleaned)["error"]["message"] == (
        f"got \"Bearer {REDACTED}\" and {REDACTED}")


def test_without_shapes_only_known_secrets_go() -> None:
    chunk = b'{"choices":[{"delta":{"content":"sk-example-in-an-answer"}}]}'
    assert scrub_bytes(chunk, byte_forms(secrets_of([HEADER])), shapes=False) == chunk
