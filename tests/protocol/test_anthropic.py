"""Anthropic's Messages API to and from the internal form: pure translations, no I/O."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
import pytest

from sidecar.errors import InvalidRequest, UpstreamError
from sidecar.protocol.anthropic import (
    StreamState,
    answer_events,
    request_to_anthropic,
    stop_reason,
    usage,
)
from sidecar.protocol.chat import (
    ChatMessage,
    ChatRequest,
    Finish,
    ImagePart,
    StreamFailure,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from sidecar.protocol.openai_chat import request_from_openai

TOOL = {"type": "function", "function": {"name": "get", "description": "Gets.",
                                         "parameters": {"type": "object"}}}


def translate(**body: Any) -> dict[str, Any]:
    return request_to_anthropic(request_from_openai({"model": "claude", **body}), 4096)


def feed(state: StreamState, kind: str, **data: Any) -> list[Any]:
    return state.feed(orjson.dumps({"type": kind, **data}))


def test_system_and_developer_messages_become_the_top_level_system() -> None:
    body = translate(messages=[{"role": "system", "content": "be brief"},
                               {"role": "developer", "content": "be kind"},
                               {"role": "user", "content": "hi"}])
    assert body["system"] == "be brief\n\nbe kind"
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


def test_max_tokens_comes_from_the_request_or_the_default() -> None:
    assert translate(messages=[])["max_tokens"] == 4096
    assert translate(messages=[], max_tokens=9)["max_tokens"] == 9
    assert translate(messages=[], max_completion_tokens=7, max_tokens=9)["max_tokens"] == 7


def test_whitespace_only_stop_sequences_are_dropped() -> None:
    assert translate(messages=[], stop=["END", " ", "\n"])["stop_sequences"] == ["END"]
    assert "stop_sequences" not in translate(messages=[], stop=" ")


@pytest.mark.parametrize(("asked", "sent"), [(0, 0.0), (0.7, 0.7), (1.5, 1.0), (2, 1.0)])
def test_temperature_is_clamped_to_anthropics_range(asked: float, sent: float) -> None:
    assert translate(messages=[], temperature=asked)["temperature"] == sent


def test_user_becomes_metadata_and_what_anthropic_lacks_is_not_sent() -> None:
    body = translate(messages=[], user="u-1", seed=3, presence_penalty=0.5, top_p=0.9, top_k=5)
    assert body["metadata"] == {"user_id": "u-1"}
    assert (body["top_p"], body["top_k"]) == (0.9, 5)
    assert not {"seed", "presence_penalty", "user"} & set(body)


def test_tools_carry_their_parameters_as_input_schema() -> None:
    assert translate(messages=[], tools=[TOOL])["tools"] == [
        {"name": "get", "description": "Gets.", "input_schema": {"type": "object"}}]


@pytest.mark.parametrize(("choice", "sent"), [
    ("auto", {"type": "auto"}), ("required", {"type": "any"}), ("none", {"type": "none"}),
    ({"type": "function", "function": {"name": "get"}}, {"type": "tool", "name": "get"})])
def test_tool_choice_maps_to_anthropics(choice: Any, sent: dict[str, Any]) -> None:
    assert translate(messages=[], tools=[TOOL], tool_choice=choice)["tool_choice"] == sent


def test_parallel_tool_calls_false_disables_parallel_tool_use() -> None:
    assert translate(messages=[], tools=[TOOL], parallel_tool_calls=False)["tool_choice"] == {
        "type": "auto", "disable_parallel_tool_use": True}
    assert "tool_choice" not in translate(messages=[], tools=[TOOL], parallel_tool_calls=True)


def test_a_tool_name_over_64_characters_is_refused_naming_the_tool() -> None:
    long = {"type": "function", "function": {"name": "n" * 65}}
    with pytest.raises(InvalidRequest) as caught:
        translate(messages=[], tools=[TOOL, long])
    assert caught.value.param == "tools[1].function.name"
    assert "n" * 64 in caught.value.message and "64" in caught.value.message
    translate(messages=[], tools=[{"type": "function", "function": {"name": "n" * 64}}])


def test_tool_calls_become_tool_use_and_tool_results_one_user_turn() -> None:
    body = translate(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get", "arguments": '{"c":1}'}},
            {"id": "b", "type": "function", "function": {"name": "get", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "a", "content": "cold"},
        {"role": "tool", "tool_call_id": "b", "content": ""},
        {"role": "user", "content": "and so?"}])
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "a", "name": "get", "input": {"c": 1}},
            {"type": "tool_use", "id": "b", "name": "get", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "a", "content": "cold"},
            {"type": "tool_result", "tool_use_id": "b"},
            {"type": "text", "text": "and so?"}]}]


def test_arguments_that_are_not_a_json_object_are_refused_naming_them() -> None:
    with pytest.raises(InvalidRequest) as caught:
        translate(messages=[{"role": "assistant", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get", "arguments": "[1"}}]}])
    assert caught.value.param == "messages[0].tool_calls[0].function.arguments"


def test_no_empty_text_block_is_sent() -> None:
    body = request_to_anthropic(ChatRequest("m", [
        ChatMessage("user", ""), ChatMessage("assistant", ""),
        ChatMessage("user", "x", parts=["", ImagePart("https://e.com/a.png"), "x"])]), 10)
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://e.com/a.png"}},
        {"type": "text", "text": "x"}]}]


def test_a_data_url_image_is_sent_as_base64_with_its_media_type() -> None:
    body = translate(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/JPEG;base64,/9j/4AAQ"}}]}])
    assert body["messages"][0]["content"] == [{"type": "image", "source": {
        "type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}}]


@pytest.mark.parametrize("url", ["data:image/tiff;base64,AAAA", "data:image/png,raw",
                                 "file:///etc/passwd", "ftp://e.com/a.png"])
def test_an_image_anthropic_cannot_take_is_refused_naming_its_place(url: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        translate(messages=[{"role": "user", "content": [
            {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert caught.value.param == "messages[0].content[1]"


@pytest.mark.parametrize(("reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter"), ("something_new", "stop")])
def test_stop_reasons_become_finish_reasons(reason: str, finish: str) -> None:
    assert stop_reason(reason) == finish


def test_a_whole_answer_becomes_text_tool_calls_finish_and_usage() -> None:
    events = answer_events({
        "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                    {"type": "text", "text": "Let me see."},
                    {"type": "tool_use", "id": "t1", "name": "get", "input": {"c": 1}},
                    {"type": "tool_use", "id": "t2", "name": "get", "input": {}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 5,
                  "cache_creation_input_tokens": 6}})
    assert events == [TextDelta("Let me see."), ToolCallDelta(0, "t1", "get", '{"c":1}'),
                      ToolCallDelta(1, "t2", "get", "{}"), Finish("tool_calls"),
                      Usage(3 + 5 + 6, 4, 5)]


@pytest.mark.parametrize("content", [True, 5, 1.5])
def test_content_that_is_not_a_list_reads_as_no_blocks(content: object) -> None:
    assert answer_events({"content": content, "stop_reason": "end_turn"}) == [
        Finish("stop"), Usage(0, 0)]


def test_a_count_that_is_negative_or_past_any_answer_reads_as_none() -> None:
    # A sum of such counts would not fit the 64 bits a JSON writer takes: the answer written
    # for the client would raise.
    assert usage({"input_tokens": -5, "output_tokens": 2**64 - 1,
                  "cache_read_input_tokens": 2**53 + 1, "cache_creation_input_tokens": 3,
                  }) == Usage(3, 0, 0)
    assert usage({"input_tokens": 2**53, "output_tokens": True}) == Usage(2**53, 0, 0)


# A tool input as deep as orjson reads (1,024 levels), past what it writes (254): an
# upstream's answer or stream event may hold one.
DEEP_INPUT = b'{"a":' * 300 + b"1" + b"}" * 300


def _deep_answer() -> list[Any]:
    return answer_events(orjson.loads(
        b'{"content":[{"type":"tool_use","id":"t","name":"get","input":' + DEEP_INPUT
        + b'}],"stop_reason":"tool_use"}'))


def _deep_stream_event() -> list[Any]:
    return StreamState().feed(
        b'{"type":"content_block_start","index":0,"content_block":'
        b'{"type":"tool_use","id":"t","name":"get","input":' + DEEP_INPUT + b"}}")


@pytest.mark.parametrize("read", [_deep_answer, _deep_stream_event])
def test_a_tool_input_nested_past_what_the_encoder_writes_never_raises_a_type_error(
        read: Any) -> None:
    # Each was a TypeError (orjson's recursion limit): a 500, or a stream's server_error.
    with contextlib.suppress(UpstreamError):  # refused as the upstream's fault: fine
        read()


def stream_with_two_tools(state: StreamState) -> list[Any]:
    events = feed(state, "message_start", message={
        "id": "msg_1", "model": "claude-x", "usage": {"input_tokens": 9, "output_tokens": 1}})
    events += feed(state, "ping")
    events += feed(state, "content_block_start", index=0,
                   content_block={"type": "text", "text": ""})
    events += feed(state, "content_block_delta", index=0,
                   delta={"type": "text_delta", "text": "Hi"})
    events += feed(state, "content_block_stop", index=0)
    for block, (tool, pieces) in enumerate([("t1", ["", '{"c":', '"Oslo"}']),
                                            ("t2", ["", '{"c":"Lima"}'])], start=1):
        events += feed(state, "content_block_start", index=block, content_block={
            "type": "tool_use", "id": tool, "name": "get", "input": {}})
        for piece in pieces:
            events += feed(state, "content_block_delta", index=block,
                           delta={"type": "input_json_delta", "partial_json": piece})
        events += feed(state, "content_block_stop", index=block)
    events += feed(state, "message_delta", delta={"stop_reason": "tool_use"},
                   usage={"output_tokens": 12})
    return events + feed(state, "message_stop")


def test_two_parallel_tool_calls_stream_with_indices_0_and_1_and_separate_arguments() -> None:
    state = StreamState()
    assert stream_with_two_tools(state) == [
        TextDelta("Hi"),
        ToolCallDelta(0, "t1", "get"), ToolCallDelta(0, arguments='{"c":'),
        ToolCallDelta(0, arguments='"Oslo"}'),
        ToolCallDelta(1, "t2", "get"), ToolCallDelta(1, arguments='{"c":"Lima"}'),
        Finish("tool_calls"), Usage(9, 12, 0)]
    assert (state.id, state.model) == ("msg_1", "claude-x")


def test_the_first_input_json_delta_with_an_empty_piece_says_nothing() -> None:
    state = StreamState()
    feed(state, "content_block_start", index=0, content_block={
        "type": "tool_use", "id": "t", "name": "get", "input": {}})
    assert feed(state, "content_block_delta", index=0,
                delta={"type": "input_json_delta", "partial_json": ""}) == []
    assert feed(state, "content_block_delta", index=0,
                delta={"type": "input_json_delta", "partial_json": "{}"}) == [
        ToolCallDelta(0, arguments="{}")]
    assert feed(state, "content_block_stop", index=0) == []


def test_a_tool_call_without_input_deltas_sends_the_input_it_started_with() -> None:
    state = StreamState()
    feed(state, "content_block_start", index=0, content_block={
        "type": "tool_use", "id": "t", "name": "get", "input": {}})
    feed(state, "content_block_delta", index=0,
         delta={"type": "input_json_delta", "partial_json": ""})
    assert feed(state, "content_block_stop", index=0) == [ToolCallDelta(0, arguments="{}")]


def test_thinking_deltas_are_not_passed_on() -> None:
    state = StreamState()
    assert feed(state, "content_block_start", index=0,
                content_block={"type": "thinking", "thinking": ""}) == []
    assert feed(state, "content_block_delta", index=0,
                delta={"type": "thinking_delta", "thinking": "hm"}) == []
    assert feed(state, "content_block_delta", index=0,
                delta={"type": "signature_delta", "signature": "s"}) == []
    assert feed(state, "content_block_stop", index=0) == []


def test_usage_of_a_stream_counts_cache_tokens_in_the_prompt() -> None:
    state = StreamState()
    feed(state, "message_start", message={"id": "m", "usage": {
        "input_tokens": 2, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 4,
        "output_tokens": 1}})
    assert feed(state, "message_delta", delta={"stop_reason": "max_tokens"},
                usage={"output_tokens": 8}) == [Finish("length"), Usage(36, 8, 30)]


def test_an_error_event_or_junk_becomes_a_failure() -> None:
    (failure,) = feed(StreamState(), "error", error={"type": "overloaded_error",
                                                     "message": "Overloaded"})
    assert isinstance(failure, StreamFailure)
    assert "overloaded_error" in failure.error.message and "Overloaded" in failure.error.message
    assert isinstance(StreamState().feed(b"not json")[0], StreamFailure)
    assert isinstance(StreamState().feed(b"[1]")[0], StreamFailure)


def test_each_stream_keeps_its_own_state() -> None:
    one, two = StreamState(), StreamState()
    feed(one, "content_block_start", index=0, content_block={
        "type": "tool_use", "id": "a", "name": "get", "input": {}})
    assert feed(two, "content_block_start", index=0, content_block={
        "type": "tool_use", "id": "b", "name": "get", "input": {}}) == [
        ToolCallDelta(0, "b", "get")]
    assert feed(two, "content_block_delta", index=3, delta={
        "type": "input_json_delta", "partial_json": "{}"}) == []
