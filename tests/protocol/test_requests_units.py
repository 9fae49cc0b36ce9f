"""Request decoding without I/O: the exact error a client reads for each refusal, the key count
that lets a compact body skip the second parse, and the prompt and input shapes accepted."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.errors import ForbiddenField, InvalidRequest
from sidecar.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    _may_repeat_keys,
    _walk,
    check_local_ranges,
    decode_body,
    validate,
)


def refusal(body: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        decode_body(body)
    return caught.value


class TestDecodeBodyMessages:
    def test_an_empty_body_says_a_json_object_was_expected(self) -> None:
        assert refusal(b"").message == "The request body is empty; expected a JSON object."

    def test_a_syntax_error_is_not_reported_as_too_deep(self) -> None:
        caught = refusal(b'{"model":}')
        assert caught.code is None
        assert caught.message == (
            "The request body is not valid JSON: unexpected character, expected a JSON value.")

    def test_a_json_value_that_is_not_an_object_says_so(self) -> None:
        assert refusal(b"[1]").message == "The request body must be a JSON object."

    def test_an_empty_object_decodes_to_an_empty_dict(self) -> None:
        assert decode_body(b"{}") == {}

    def test_a_forbidden_key_names_the_field_and_why(self) -> None:
        with pytest.raises(ForbiddenField) as caught:
            decode_body(b'{"model":"m","apiKey":"sk-x"}')
        assert caught.value.message == (
            "The field `apiKey` is not accepted: the sidecar decides where requests go and "
            "which credentials they carry.")

    def test_the_repeated_key_named_is_the_repeated_one_not_the_first(self) -> None:
        caught = refusal(b'{"a":1,"b":1,"b" :2}')
        assert caught.param == "b"
        assert caught.message == "The field `b` appears more than once in one object; send it once."


class TestKeyCount:
    def test_keys_are_counted_at_every_depth_in_objects_and_lists(self) -> None:
        assert _walk({"a": {"b": 1, "c": 2}, "d": [{"e": 1}, [{"f": 1, "g": 2}]]}, 1) == 7

    def test_a_forbidden_key_anywhere_gives_minus_one(self) -> None:
        assert _walk({"a": [{"b": {"api_key": 1}}]}, 1) == -1
        assert _walk({"a": {"base-url": 1}}, 1) == -1

    @pytest.mark.parametrize(
        "body",
        [
            b'{"a":1,"b":{"c":2}}',
            # An escaped quote followed by a colon inside a string is not a key.
            b'{"a":"x\\":y"}',
            # A quote followed by a space, but no space before any colon.
            b'{"a":"x" }',
        ],
    )
    def test_a_body_with_as_many_keys_written_as_parsed_needs_no_second_parse(
            self, body: bytes) -> None:
        assert not _may_repeat_keys(body, _walk(decode_body(body), 1))

    @pytest.mark.parametrize("space", [b" ", b"\n", b"\t", b"\r"])
    def test_whitespace_before_a_colon_always_takes_the_exact_check(self, space: bytes) -> None:
        body = b'{"a"' + space + b':1,"a":2}'
        assert _may_repeat_keys(body, 1)
        assert refusal(body).param == "a"

    def test_more_keys_written_than_parsed_takes_the_exact_check(self) -> None:
        assert _may_repeat_keys(b'{"a":1,"a":2}', 1)


class TestPromptShapes:
    @pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2], [[1, 2], [3]]])
    def test_text_or_token_prompts_are_accepted(self, prompt: Any) -> None:
        parsed = validate({"model": "m", "prompt": prompt}, CompletionRequest)
        assert parsed.prompt == prompt

    def test_an_empty_prompt_list_is_refused_naming_it(self) -> None:
        with pytest.raises(InvalidRequest) as caught:
            validate({"model": "m", "prompt": []}, CompletionRequest)
        assert caught.value.param == "prompt"
        assert caught.value.message == "Invalid value for `prompt`: must not be empty."

    @pytest.mark.parametrize("value", [[["a"]], [[True]], [[]], [1, "a"], [True]])
    def test_other_shapes_of_input_are_refused_saying_what_is_accepted(
            self, value: Any) -> None:
        with pytest.raises(InvalidRequest) as caught:
            validate({"model": "m", "input": value}, EmbeddingRequest)
        assert caught.value.param == "input"
        assert caught.value.message == (
            "Invalid value for `input`: expected a string, a list of strings, a list of token "
            "ids or a list of lists of token ids.")

    def test_an_empty_input_list_is_refused_naming_it(self) -> None:
        with pytest.raises(InvalidRequest) as caught:
            validate({"model": "m", "input": []}, EmbeddingRequest)
        assert caught.value.message == "Invalid value for `input`: must not be empty."


class TestLocalRanges:
    def test_a_temperature_over_two_says_what_a_local_model_takes(self) -> None:
        parsed = validate({"model": "m", "prompt": "x", "temperature": 2.5}, CompletionRequest)
        with pytest.raises(InvalidRequest) as caught:
            check_local_ranges(parsed)
        assert caught.value.message == (
            "Invalid value for `temperature`: 2.5 is over 2, the most a local model takes.")

    @pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
    def test_a_penalty_outside_the_range_names_it_and_the_range(self, name: str) -> None:
        parsed = validate({"model": "m", "prompt": "x", name: -2.5}, CompletionRequest)
        with pytest.raises(InvalidRequest) as caught:
            check_local_ranges(parsed)
        assert caught.value.param == name
        assert caught.value.message == f"Invalid value for `{name}`: -2.5 is outside -2..2."


class TestExplain:
    def test_a_value_containing_the_separator_does_not_move_the_param(self) -> None:
        body = {"model": "m", "messages": [{"role": "x - at y"}]}
        with pytest.raises(InvalidRequest) as caught:
            validate(body, ChatCompletionRequest)
        assert caught.value.param == "messages[0].role"
        assert caught.value.message == (
            "Invalid value for `messages[0].role`: Invalid enum value 'x - at y'.")
