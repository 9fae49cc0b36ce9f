"""OpenAI's chat protocol to and from the internal form: pure translations, no I/O."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sidecar.errors import InvalidRequest
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
from sidecar.protocol.openai_chat import (
    ChunkWriter,
    answer_json,
    events_from_answer,
    events_from_chunk,
    request_from_openai,
    request_to_openai,
)

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def test_a_chat_body_becomes_the_internal_form() -> None:
    request = request_from_openai({
        "model": "m", "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0,
        "stop": "END", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]}],
    })
    assert request.messages == [ChatMessage("system", "be brief"), ChatMessage("user", "a\nb")]
    assert request.max_tokens == 7  # max_completion_tokens wins, as OpenAI says
    assert request.temperature == 0.0
    assert request.stop == ("END",)
    assert request.stream and request.include_usage


def test_tools_and_tool_calls_survive_a_round_trip() -> None:
    body = {
        "model": "m", "temperature": 0.5, "seed": 3, "stop": ["x", "y"],
        "tools": [{"type": "function", "function": {"name": "get", "parameters": {}}}],
        "tool_choice": "auto",
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get", "arguments": "{\"city\":\"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
        ],
    }
    assert request_to_openai(request_from_openai(body)) == body


def test_image_parts_are_carried_in_order_beside_the_text() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                            "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]}]}
    (message,) = request_from_openai(body).messages
    assert message.content == "what is it?"
    assert message.parts == ["what is it?", ImagePart("data:image/png;base64,AAAA", "low"),
                             ImagePart("https://example.com/a.jpg")]
    assert request_to_openai(request_from_openai(body)) == body


def test_a_part_that_is_neither_text_nor_image_is_refused_naming_its_place() -> None:
    with pytest.raises(InvalidRequest) as caught:
        request_from_openai({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]})
    assert caught.value.param == "messages[0].content[0]"
    with pytest.raises(InvalidRequest):
        request_from_openai({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})


@pytest.mark.parametrize(("field", "param"), [
    ({"tools": 1}, "tools"), ({"tools": True}, "tools"), ({"tools": {"a": 1}}, "tools"),
    ({"tool_choice": 1}, "tool_choice"), ({"tool_choice": ["auto"]}, "tool_choice"),
    ({"tool_choice": False}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": 1.5}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": {"id": "c"}}]},
     "messages[0].tool_calls"),
])
def test_tools_tool_choice_or_tool_calls_of_the_wrong_type_are_refused_naming_them(
        field: dict[str, Any], param: str) -> None:
    # These fields are not in the validated schema: a number here was a TypeError (or an
    # AttributeError once written for Anthropic), a 500 to the client.
    with pytest.raises(InvalidRequest) as caught:
        request_from_openai({"model": "m", "messages": [{"role": "user", "content": "x"}],
                             **field})
    assert caught.value.param == param


def test_parallel_tool_calls_survive_a_round_trip() -> None:
    body = {"model": "m", "messages": [], "parallel_tool_calls": False}
    assert request_from_openai(body).parallel_tool_calls is False
    assert request_to_openai(request_from_openai(body)) == body


def test_a_chunk_becomes_its_events() -> None:
    chunk = {**HEAD, "choices": [{"index": 0, "delta": {"content": "Hi", "tool_calls": [
        {"index": 0, "id": "c1", "type": "function",
         "function": {"name": "f", "arguments": "{"}}]}, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    assert events_from_chunk(orjson.dumps(chunk)) == [
        TextDelta("Hi"), ToolCallDelta(0, "c1", "f", "{"), Finish("tool_calls"), Usage(3, 2)]


def test_an_error_event_or_junk_becomes_a_failure() -> None:
    (failure,) = events_from_chunk(b'{"error": {"message": "overloaded"}}')
    assert isinstance(failure, StreamFailure) and "overloaded" in failure.error.message
    assert isinstance(events_from_chunk(b"not json")[0], StreamFailure)
    assert isinstance(events_from_chunk(b"[1]")[0], StreamFailure)


@pytest.mark.parametrize("event", [TextDelta("a"), ToolCallDelta(1, "c", "f", "{}"),
                                   Finish("length"), Usage(4, 6)])
def test_what_the_writer_writes_reads_back_as_the_same_event(event: object) -> None:
    writer = ChunkWriter(HEAD, chat=True)
    assert events_from_chunk(writer.event(event)) == [event]  # type: ignore[arg-type]


def test_the_role_chunk_carries_no_text() -> None:
    chunk = orjson.loads(ChunkWriter(HEAD, chat=True).role())
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert events_from_chunk(ChunkWriter(HEAD, chat=True).role()) == []


def test_a_whole_answer_joins_the_text_and_keeps_the_last_finish_and_usage() -> None:
    body = orjson.loads(answer_json({"id": "x", "object": "chat.completion"}, True, [
        TextDelta("Hel"), TextDelta("lo"), Finish("length"), Usage(2, 2)]))
    assert body["choices"][0]["message"]["content"] == "Hello"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    legacy = orjson.loads(answer_json({"object": "text_completion"}, False, [TextDelta("a")]))
    assert legacy["choices"][0]["text"] == "a" and "usage" not in legacy


def test_a_whole_answer_carries_its_tool_calls_with_null_content() -> None:
    body = orjson.loads(answer_json({"id": "x"}, True, [
        ToolCallDelta(0, "c0", "f", '{"a"'), ToolCallDelta(1, "c1", "g", "{}"),
        ToolCallDelta(0, arguments=":1}"), Finish("tool_calls")]))
    message = body["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "c0", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
        {"id": "c1", "type": "function", "function": {"name": "g", "arguments": "{}"}}]


def test_cached_prompt_tokens_are_written_and_read_back() -> None:
    chunk = ChunkWriter(HEAD, chat=True).event(Usage(10, 2, cached_tokens=7))
    assert orjson.loads(chunk)["usage"]["prompt_tokens_details"] == {"cached_tokens": 7}
    assert events_from_chunk(chunk) == [Usage(10, 2, 7)]


def test_the_internal_form_needs_only_a_model() -> None:
    assert request_to_openai(ChatRequest(model="m")) == {"model": "m", "messages": []}


@pytest.mark.parametrize("chunk", [
    {"choices": 5},
    {"choices": [{"index": 0, "delta": "text"}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [5, {"index": "a", "function": 7}]}}]},
    {"choices": [], "usage": {"prompt_tokens": "many", "completion_tokens": [1]}},
    {"choices": [], "usage": {"prompt_tokens": -5, "completion_tokens": 2,
                              "prompt_tokens_details": {"cached_tokens": -1}}},
])
def test_a_malformed_chunk_reads_as_what_it_holds_and_never_raises(chunk: dict[str, Any]
                                                                   ) -> None:
    events = events_from_chunk(orjson.dumps(chunk))
    assert all(not isinstance(e, ToolCallDelta) or (e.index == 0 and e.name is None)
               for e in events)
    usages = [e for e in events if isinstance(e, Usage)]
    assert all(u.prompt_tokens == 0 and u.cached_tokens is None for u in usages)


def test_a_malformed_answer_reads_as_what_it_holds_and_never_raises() -> None:
    events = events_from_answer({
        "choices": [{"message": {"content": "Hi", "tool_calls": 3}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": "x", "completion_tokens": 4}})
    assert events == [TextDelta("Hi"), Finish("stop"), Usage(0, 4)]


def test_a_count_past_any_answer_reads_as_none() -> None:
    # Prompt and completion tokens sum to a total that would not fit the 64 bits a JSON
    # writer takes: the chunk or answer written for the client would raise.
    usage = {"prompt_tokens": 2**64 - 1, "completion_tokens": 2**53 + 1,
             "prompt_tokens_details": {"cached_tokens": 2**63}}
    assert events_from_answer({"usage": usage}) == [Usage(0, 0)]
    assert events_from_chunk(orjson.dumps({"choices": [], "usage": usage})) == [Usage(0, 0)]
    limit = {"prompt_tokens": 2**53, "completion_tokens": 2**53}
    assert events_from_answer({"usage": limit}) == [Usage(2**53, 2**53)]
