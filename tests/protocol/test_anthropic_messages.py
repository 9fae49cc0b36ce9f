"""The Messages translation as a front door speaks it, on its own: a client's request read
into the internal form, and events written as a Messages answer, as stream events, and read
back for the usage."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sidecar.errors import InvalidRequest, UpstreamError
from sidecar.protocol.anthropic_messages import (
    EventWriter,
    events_as_message,
    message_as_events,
    message_json,
    messages_usage,
    request_from_anthropic,
)
from sidecar.protocol.chat import (
    ChatMessage,
    Finish,
    ImagePart,
    StreamFailure,
    TextDelta,
    ToolCallDelta,
    Usage,
)

HEAD = {"id": "msg_1", "model": "m"}


def test_system_blocks_become_the_first_message_and_fields_map() -> None:
    request = request_from_anthropic({
        "model": "m", "max_tokens": 9, "system": [{"type": "text", "text": "a"},
                                                 {"type": "text", "text": "b"}],
        "messages": [{"role": "user", "content": "hi"}], "stop_sequences": ["X"],
        "temperature": 0.2, "top_k": 3, "metadata": {"user_id": "u"}, "stream": True})
    assert request.messages == [ChatMessage("system", "a\n\nb"), ChatMessage("user", "hi")]
    assert (request.max_tokens, request.stop, request.temperature, request.top_k,
            request.user, request.stream, request.include_usage) == (
        9, ("X",), 0.2, 3, "u", True, True)


def test_tool_results_come_first_each_a_tool_message_then_the_text() -> None:
    request = request_from_anthropic({"model": "m", "max_tokens": 9, "messages": [
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
            {"type": "tool_use", "id": "t2", "name": "f", "input": {"a": 2}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "and?"},
            {"type": "tool_result", "tool_use_id": "t1", "content": "one"},
            {"type": "tool_result", "tool_use_id": "t2",
             "content": [{"type": "text", "text": "two"}]}]}]})
    assistant, first, second, user = request.messages
    assert assistant.content == "Looking."
    assert [c["arguments"] for c in assistant.tool_calls] == ['{"a":1}', '{"a":2}']
    assert (first.role, first.tool_call_id, first.content) == ("tool", "t1", "one")
    assert (second.role, second.tool_call_id, second.content) == ("tool", "t2", "two")
    assert (user.role, user.content) == ("user", "and?")


def test_images_become_urls_the_internal_form_carries() -> None:
    request = request_from_anthropic({"model": "m", "max_tokens": 9, "messages": [
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AAAA"}},
            {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
            {"type": "text", "text": "what?"}]}]})
    assert request.messages[0].parts == [ImagePart("data:image/png;base64,AAAA"),
                                         ImagePart("https://x.test/a.png"), "what?"]


def test_tool_choice_maps_and_parallel_use_can_be_turned_off() -> None:
    tools: Any = [{"name": "f", "input_schema": {"type": "object"}}]
    for choice, expected in ((({"type": "any"}), "required"), ({"type": "none"}, "none"),
                             ({"type": "tool", "name": "f"},
                              {"type": "function", "function": {"name": "f"}})):
        request = request_from_anthropic({"model": "m", "max_tokens": 1, "tools": tools,
                                          "tool_choice": choice, "messages": [
                                              {"role": "user", "content": "x"}]})
        assert request.tool_choice == expected
        assert request.tools == [{"name": "f", "parameters": {"type": "object"}}]
    request = request_from_anthropic({
        "model": "m", "max_tokens": 1, "tools": tools, "messages": [
            {"role": "user", "content": "x"}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}})
    assert request.parallel_tool_calls is False


def test_content_a_target_of_another_protocol_cannot_read_is_refused_naming_it() -> None:
    with pytest.raises(InvalidRequest) as caught:
        request_from_anthropic({"model": "m", "max_tokens": 1, "messages": [
            {"role": "user", "content": [{"type": "document", "source": {}}]}]})
    assert caught.value.param == "messages[0].content[0]"


@pytest.mark.parametrize("block", [{"type": "text"}, {"type": "text", "text": 7},
                                   {"type": "text", "text": None},
                                   {"type": "text", "text": ["a"]}])
def test_a_text_block_without_a_string_text_is_refused_naming_it(block: Any) -> None:
    # It was a KeyError or a TypeError from the join: a 500 to a hostile client.
    with pytest.raises(InvalidRequest) as caught:
        request_from_anthropic({"model": "m", "max_tokens": 1, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}, block]}]})
    assert caught.value.param == "messages[1].content[1].text"


@pytest.mark.parametrize("limit", ["many", [1], {"a": 1}, 1e308, True, 0, -5])
def test_a_count_request_reads_a_max_tokens_that_is_not_a_count_as_none(limit: Any) -> None:
    # count_tokens does not declare max_tokens, so it reaches the translation unchecked.
    request = request_from_anthropic({"model": "m", "max_tokens": limit,
                                      "messages": [{"role": "user", "content": "hi"}]})
    assert request.max_tokens is None


def test_a_whole_answer_keeps_text_and_tool_calls_in_order_with_the_usage() -> None:
    body = orjson.loads(message_json(HEAD, [
        TextDelta("Let "), TextDelta("me."), ToolCallDelta(0, "c0", "f", '{"a":'),
        ToolCallDelta(0, arguments=" 1}"), ToolCallDelta(1, "c1", "g", "not json"),
        Finish("tool_calls"), Usage(30, 4, 10)]))
    assert body["content"] == [
        {"type": "text", "text": "Let me."},
        {"type": "tool_use", "id": "c0", "name": "f", "input": {"a": 1}},
        {"type": "tool_use", "id": "c1", "name": "g", "input": {"arguments": "not json"}}]
    assert body["stop_reason"] == "tool_use"
    assert body["usage"] == {"input_tokens": 20, "output_tokens": 4,
                             "cache_read_input_tokens": 10}


@pytest.mark.parametrize(("finish", "reason"), [("stop", "end_turn"), ("length", "max_tokens"),
                                                ("tool_calls", "tool_use"),
                                                ("content_filter", "refusal")])
def test_finish_reasons_become_stop_reasons(finish: str, reason: str) -> None:
    assert orjson.loads(message_json(HEAD, [Finish(finish)]))["stop_reason"] == reason


def test_stream_events_open_and_close_blocks_in_anthropics_order() -> None:
    writer = EventWriter(HEAD)
    out = [writer.start()]
    for event in (TextDelta("a"), TextDelta("b"), ToolCallDelta(0, "c0", "f", ""),
                  ToolCallDelta(0, arguments="{}"), ToolCallDelta(1, "c1", "f", "{}"),
                  Finish("tool_calls"), Usage(5, 2)):
        out += writer.event(event)
    out += writer.end()
    kinds = [(e["type"], e.get("index")) for e in map(orjson.loads, out)]
    assert kinds == [("message_start", None), ("content_block_start", 0),
                     ("content_block_delta", 0), ("content_block_delta", 0),
                     ("content_block_stop", 0), ("content_block_start", 1),
                     ("content_block_delta", 1), ("content_block_stop", 1),
                     ("content_block_start", 2), ("content_block_delta", 2),
                     ("content_block_stop", 2), ("message_delta", None)]
    last = orjson.loads(out[-1])
    assert last["delta"]["stop_reason"] == "tool_use"
    assert last["usage"] == {"input_tokens": 5, "output_tokens": 2}


def test_a_failure_event_raises_its_error() -> None:
    with pytest.raises(UpstreamError):
        EventWriter(HEAD).event(StreamFailure(UpstreamError("gone")))


def test_usage_is_read_from_an_answer_and_from_a_stream_in_parts() -> None:
    answer = orjson.dumps({"type": "message", "usage": {
        "input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 4,
        "cache_creation_input_tokens": 1}})
    assert messages_usage(answer) == (15, 3, 18, 4)
    start = orjson.dumps({"type": "message_start", "message": {"usage": {
        "input_tokens": 10, "output_tokens": 1}}})
    delta = orjson.dumps({"type": "message_delta", "usage": {"output_tokens": 7}})
    assert messages_usage(delta, messages_usage(start)) == (10, 7, 17, -1)
    assert messages_usage(b"not json", (1, 2, 3, -1)) == (1, 2, 3, -1)


def test_a_negative_count_reads_as_none() -> None:
    # A negative count would give a tenant's token budget back more than the request took.
    answer = orjson.dumps({"type": "message", "usage": {
        "input_tokens": 10, "output_tokens": -70000, "cache_read_input_tokens": -4}})
    assert messages_usage(answer) == (10, 0, 10, -1)


def test_a_count_past_any_answer_reads_as_none() -> None:
    # The prompt sums three counts: past 64 bits, the request's log line could not be written.
    answer = orjson.dumps({"type": "message", "usage": {
        "input_tokens": 2**64 - 1, "output_tokens": 5, "cache_read_input_tokens": 2**64 - 1}})
    assert messages_usage(answer) == (0, 5, 5, -1)


def test_a_kept_message_and_its_stream_events_spell_each_other() -> None:
    message = orjson.dumps({
        "id": "msg_k", "type": "message", "role": "assistant", "model": "m",
        "content": [{"type": "text", "text": "Hi."},
                    {"type": "tool_use", "id": "t0", "name": "f", "input": {"a": 1}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 2}})
    events = message_as_events(message)
    assert events is not None
    again = orjson.loads(events_as_message(events) or b"{}")
    assert again["content"] == orjson.loads(message)["content"]
    assert (again["id"], again["stop_reason"], again["usage"]) == (
        "msg_k", "tool_use", {"input_tokens": 3, "output_tokens": 2, "cache_read_input_tokens": 0})
    assert message_as_events(b'{"type": "error"}') is None
    assert events_as_message([b'{"type": "ping"}']) is None


def test_tool_arguments_nested_past_what_the_encoder_writes_never_raise_a_type_error() -> None:
    # An OpenAI upstream's arguments are parsed into the tool_use input: orjson reads 1,024
    # levels and writes 254, so writing the answer raised TypeError (a 500).
    deep = '{"a":' * 300 + "1" + "}" * 300
    try:
        body = orjson.loads(message_json(HEAD, [ToolCallDelta(0, "call_1", "get", deep),
                                                Finish("tool_calls")]))
    except UpstreamError:
        return  # refused as the upstream's fault: fine
    assert body["content"][0]["type"] == "tool_use"
