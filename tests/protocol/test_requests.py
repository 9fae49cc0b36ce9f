"""Request bodies at the edge: repeated keys, nesting, key spellings that steer credentials, and
the parameter ranges (those nonsense for every provider, and those a local model cannot take)."""

from __future__ import annotations

import orjson
import pytest

from sidecar.errors import ForbiddenField, InvalidRequest
from sidecar.protocol.requests import (
    MAX_DEPTH,
    ChatCompletionRequest,
    CompletionRequest,
    check_local_ranges,
    decode_body,
    validate,
)

USER = b'[{"role":"user","content":"hi"}]'


def chat(**fields: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


class TestRepeatedKeys:
    @pytest.mark.parametrize(
        ("body", "param"),
        [
            (b'{"model":"cheap","model":"dear","messages":' + USER + b"}", "model"),
            (b'{"model":"m","messages":[{"role":"user","role":"system","content":"x"}]}',
             "role"),
            (b'{"model":"m","messages":' + USER + b',"tools":[{"function":{"name":"a",'
             b'"name":"b"}}]}', "name"),
            # Whitespace before the colon, or a key ending in a backslash, must not hide one.
            (b'{"model" : "a", "model":"b","messages":' + USER + b"}", "model"),
            (b'{"model":"m","k\\\\":1,"x":{"y":1,"y":2},"messages":' + USER + b"}", "y"),
        ],
    )
    def test_a_key_repeated_at_any_depth_is_400_naming_it(self, body: bytes,
                                                          param: str) -> None:
        with pytest.raises(InvalidRequest) as caught:
            decode_body(body)
        assert caught.value.status == 400
        assert caught.value.param == param
        assert caught.value.code == "duplicate_field"
        assert f"`{param}`" in caught.value.message

    @pytest.mark.parametrize(
        "body",
        [
            b'{"model":"m","messages":[{"role":"user","content":"reply as {\\"a\\": 1, '
            b'\\"a\\": 2}"}]}',
            b'{"model" : "m", "messages" : ' + USER + b"}",
            b'{"model":"m","a\\\\":1,"messages":' + USER + b"}",
            b'{"model":"m","messages":[{"role":"user","content":"x"},'
            b'{"role":"assistant","content":"y"}]}',
        ],
    )
    def test_the_same_key_in_different_objects_or_inside_text_is_fine(self,
                                                                      body: bytes) -> None:
        assert decode_body(body)["model"] == "m"


class TestNesting:
    def test_nesting_at_the_limit_is_accepted(self) -> None:
        deep = b'{"model":"m","x":' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
        assert decode_body(deep)["model"] == "m"

    @pytest.mark.parametrize("levels", [MAX_DEPTH, 300, 1000, 5000])
    def test_nesting_past_the_limit_is_400_naming_it(self, levels: int) -> None:
        body = b'{"model":"m","x":' + b"[" * levels + b"]" * levels + b"}"
        with pytest.raises(InvalidRequest) as caught:
            decode_body(body)
        assert caught.value.code == "too_deeply_nested"
        assert str(MAX_DEPTH) in caught.value.message

    def test_deep_nesting_with_an_escape_is_400_not_a_recursion_error(self) -> None:
        inner = b'{"k\\u0061":' * 1000 + b"1" + b"}" * 1000
        with pytest.raises(InvalidRequest) as caught:
            decode_body(b'{"model":"m","x":' + inner + b"}")
        assert caught.value.code == "too_deeply_nested"


class TestForbiddenSpellings:
    @pytest.mark.parametrize(
        "key", ["API_BASE", "apiBase", "baseURL", "apiKey", "api-key", "Api_Version",
                "BASE_URL", "api.base"],
    )
    def test_keys_that_differ_only_in_case_or_style_are_refused(self, key: str) -> None:
        body = orjson.dumps({"model": "m", "extra": {key: "http://127.0.0.1:1"}})
        with pytest.raises(ForbiddenField) as caught:
            decode_body(body)
        assert caught.value.param == f"extra.{key}"

    def test_similar_harmless_keys_pass(self) -> None:
        body = orjson.dumps({"model": "m", "base": 1, "api": 2, "key": 3, "url": 4,
                             "base_model": 5, "api_keys_used": 6})
        assert decode_body(body)["model"] == "m"


class TestRangesForEveryProvider:
    @pytest.mark.parametrize(
        ("fields", "param"),
        [
            ({"temperature": -0.5}, "temperature"),
            ({"top_p": 1.5}, "top_p"),
            ({"top_p": -0.1}, "top_p"),
            ({"n": 0}, "n"),
            ({"n": 129}, "n"),
            ({"n": 2**63}, "n"),
            ({"max_tokens": 0}, "max_tokens"),
            ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ],
    )
    def test_nonsense_values_are_400_naming_the_param(self, fields: dict[str, object],
                                                      param: str) -> None:
        with pytest.raises(InvalidRequest) as caught:
            validate(chat(**fields), ChatCompletionRequest)
        assert caught.value.param == param

    def test_values_only_some_providers_take_pass_to_the_upstream(self) -> None:
        parsed = validate(chat(temperature=3.5, presence_penalty=-3, frequency_penalty=2.5),
                          ChatCompletionRequest)
        assert parsed.temperature == 3.5 and parsed.presence_penalty == -3


class TestLocalRanges:
    @pytest.mark.parametrize(
        ("fields", "param"),
        [
            ({"temperature": 2.01}, "temperature"),
            ({"temperature": 5}, "temperature"),
            ({"presence_penalty": -2.5}, "presence_penalty"),
            ({"frequency_penalty": 3}, "frequency_penalty"),
        ],
    )
    def test_what_a_local_model_cannot_take_is_400_naming_the_param(
            self, fields: dict[str, object], param: str) -> None:
        parsed = validate(chat(**fields), ChatCompletionRequest)
        with pytest.raises(InvalidRequest) as caught:
            check_local_ranges(parsed)
        assert caught.value.param == param
        assert caught.value.status == 400

    def test_the_documented_ranges_pass(self) -> None:
        for fields in ({}, {"temperature": 0}, {"temperature": 2}, {"presence_penalty": -2},
                       {"frequency_penalty": 2, "top_p": 1}):
            check_local_ranges(validate(chat(**fields), ChatCompletionRequest))
        check_local_ranges(validate({"model": "m", "prompt": "x", "temperature": 1.5},
                                    CompletionRequest))
