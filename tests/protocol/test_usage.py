"""Reading an answer's usage: the pattern for the common form and the JSON parse for the rest
agree, and only the answer's own usage counts."""

from __future__ import annotations

import orjson
import pytest

from sidecar.protocol.usage import usage_of

USAGE = b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}'


@pytest.mark.parametrize("body", [
    b'{"id":"x",' + USAGE + b'}',
    b'{' + USAGE.replace(b":", b" : ", 1) + b', "model": "m"}',
    # Another "usage" nested after the answer's own (as Groq's x_groq carries one).
    b'{"id":"x",' + USAGE + b',"x_groq":{"usage":{"total_tokens":99}}}',
    # The word in the text, escaped, and as the last string of the answer.
    b'{' + USAGE + b',"choices":[{"message":{"content":"say \\"usage\\": 5"}}]}',
    b'{' + USAGE + b',"choices":[{"message":{"content":"usage"}}]}',
])
def test_the_usage_counted_is_the_answers_own(body: bytes) -> None:
    assert usage_of(body) == (3, 4, 7, -1)


def test_cached_prompt_tokens_are_read_when_the_answer_gives_them() -> None:
    body = (b'{"usage":{"prompt_tokens":30,"completion_tokens":4,"total_tokens":34,'
            b'"prompt_tokens_details":{"cached_tokens":24}}}')
    assert usage_of(body) == (30, 4, 34, 24)


@pytest.mark.parametrize("body", [b'{"usage":null}', b'{"usage":{"total_tokens":5}',
                                  b'["usage"]', b'{"choices":[]}', b""])
def test_an_answer_without_a_readable_usage_has_none(body: bytes) -> None:
    assert usage_of(body) is None


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22},
    {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34,
     "prompt_tokens_details": {"cached_tokens": 24}},
    {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34,
     "prompt_tokens_details": {"cached_tokens": 24, "audio_tokens": 0}},
    {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
     "completion_tokens_details": {"reasoning_tokens": 0}},
    {"completion_tokens": 2, "prompt_tokens": 1, "total_tokens": 3},
])
@pytest.mark.parametrize("after", [b"}", b"}\n", b',"system_fingerprint":"fp_1"}'])
def test_every_form_of_usage_reads_as_its_json_says(usage: dict[str, object],
                                                    after: bytes) -> None:
    body = b'{"id":"x","choices":[],"usage":' + orjson.dumps(usage) + after
    details = usage.get("prompt_tokens_details")
    cached = details["cached_tokens"] if isinstance(details, dict) else -1
    assert usage_of(body) == (usage["prompt_tokens"], usage["completion_tokens"],
                              usage["total_tokens"], cached)


def test_a_usage_nested_in_the_last_object_is_not_the_answers() -> None:
    # Ends like the common form, but the usage sits one object deeper than the answer's own.
    body = (b'{"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2},'
            b'"x":{"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}}')
    assert usage_of(body) == (1, 1, 2, -1)


LONG = b'"choices":[{"message":{"content":"' + b"words \\\"quoted\\\" " * 400 + b'"}}]'


@pytest.mark.parametrize("body", [
    b'{' + LONG + b',' + USAGE + b'}',
    b'{' + USAGE + b',' + LONG + b'}',
    b'{' + LONG + b',' + USAGE + b',"x_groq":{"usage":{"total_tokens":99}}}',
])
def test_a_long_answers_usage_is_its_own(body: bytes) -> None:
    assert len(body) > 4096
    assert usage_of(body) == (3, 4, 7, -1)


def test_counts_of_another_type_read_as_none() -> None:
    body = b'{"usage":{"prompt_tokens":"3","completion_tokens":true,"total_tokens":7}}'
    assert usage_of(body) == (0, 0, 7, -1)


def test_negative_counts_read_as_none() -> None:
    # A negative total would give a tenant's token budget back more than the request took.
    body = b'{"usage":{"prompt_tokens":-3,"completion_tokens":4,"total_tokens":-70000}}'
    assert usage_of(body) is None
    body = (b'{"usage":{"prompt_tokens":-3,"completion_tokens":4,"total_tokens":7,'
            b'"prompt_tokens_details":{"cached_tokens":-1}}}')
    assert usage_of(body) == (0, 4, 7, -1)


def test_a_count_past_any_answer_reads_as_none() -> None:
    # 2**64 - 1 as the total would drain a tenant's token budget at once.
    body = (b'{"usage":{"prompt_tokens":3,"completion_tokens":4,'
            b'"total_tokens":18446744073709551615}}')
    assert usage_of(body) is None
