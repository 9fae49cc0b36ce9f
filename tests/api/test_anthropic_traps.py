"""The Anthropic front door's known traps and refusals, through the sidecar as a real process:
an OpenAI stream's parallel tool calls and a chunk with both text and a finish reason become
the right Messages events, streams translated at once never mix, and what the door refuses it
refuses in Anthropic's shape, naming the field; a malformed field that only a translation reads
is a 400 in the shape of whichever door it came through."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from tests.support.anthropic_mock import AnthropicMock
from tests.support.messages_door import async_client, client, said, script, sse_events, start_door
from tests.support.scripted_upstream import ScriptedUpstream, chat_chunk, tool_chunk
from tests.support.sidecar import Sidecar
from tests.support.upstream_mock import MockUpstream


@pytest.fixture(scope="module")
def door(claude: AnthropicMock, scripted: ScriptedUpstream, mock_upstream: MockUpstream,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    instance = start_door(mock_upstream, claude, scripted, tmp_path_factory.mktemp("traps"))
    yield instance
    instance.stop()


def stream(door: Sidecar, messages: Any) -> list[tuple[str, dict[str, Any]]]:
    reply = httpx.post(door.url + "/v1/messages", timeout=10, json={
        "model": "scripted", "max_tokens": 64, "stream": True, "messages": messages})
    assert reply.status_code == 200, reply.text
    return sse_events(reply.text)


def test_two_parallel_openai_tool_calls_become_two_tool_use_blocks(door: Sidecar) -> None:
    events = stream(door, script(
        tool_chunk(0, "call_a", "weather"), tool_chunk(0, arguments='{"city":'),
        tool_chunk(0, arguments=' "Oslo"}'), tool_chunk(1, "call_b", "weather"),
        tool_chunk(1, arguments='{"city": "Lima"}'), chat_chunk(finish="tool_calls")))
    starts = [data for name, data in events if name == "content_block_start"]
    assert [(s["index"], s["content_block"]["id"]) for s in starts] == [(0, "call_a"),
                                                                         (1, "call_b")]
    pieces: dict[int, str] = {}
    for name, data in events:
        if name == "content_block_delta":
            assert data["delta"]["type"] == "input_json_delta"
            pieces[data["index"]] = pieces.get(data["index"], "") + data["delta"]["partial_json"]
    assert pieces == {0: '{"city": "Oslo"}', 1: '{"city": "Lima"}'}
    # Each block is stopped before the next one starts, as Anthropic streams them.
    names = [(name, data.get("index")) for name, data in events]
    assert names.index(("content_block_stop", 0)) < names.index(("content_block_start", 1))
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_the_sdk_reads_parallel_tool_calls_with_separate_inputs(door: Sidecar) -> None:
    with client(door).messages.stream(model="scripted", max_tokens=64, messages=script(
            tool_chunk(0, "call_a", "weather", '{"city": "Oslo"}'),
            tool_chunk(1, "call_b", "weather", '{"city": "Lima"}'),
            chat_chunk(finish="tool_calls"))) as reader:
        final = reader.get_final_message()
    inputs = [(b.id, b.input) for b in final.content if b.type == "tool_use"]
    assert inputs == [("call_a", {"city": "Oslo"}), ("call_b", {"city": "Lima"})]


def test_a_chunk_with_text_and_a_finish_reason_becomes_a_delta_then_the_stop(
        door: Sidecar) -> None:
    events = stream(door, script(chat_chunk("Hello"), chat_chunk(" world", finish="length")))
    names = [name for name, _ in events]
    assert names == ["message_start", "content_block_start", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta",
                     "message_stop"]
    assert events[3][1]["delta"] == {"type": "text_delta", "text": " world"}
    assert events[5][1]["delta"]["stop_reason"] == "max_tokens"


def test_text_after_a_tool_call_opens_a_new_block(door: Sidecar) -> None:
    events = stream(door, script(chat_chunk("Let me look."), tool_chunk(0, "c1", "f", "{}"),
                                 chat_chunk(finish="tool_calls")))
    starts = [data["content_block"]["type"] for name, data in events
              if name == "content_block_start"]
    assert starts == ["text", "tool_use"]


def test_an_error_event_from_an_openai_target_ends_the_stream_in_anthropics_shape(
        door: Sidecar) -> None:
    events = stream(door, script(chat_chunk("partial"),
                                 '{"error": {"message": "exploded", "type": "server_error"}}'))
    assert events[-1][0] == "error"
    assert events[-1][1] == {"type": "error", "error": {"type": "api_error",
                                                        "message": "exploded"}}
    assert "message_stop" not in [name for name, _ in events]


def test_concurrent_translated_streams_never_mix(door: Sidecar) -> None:
    async def one(aclient: anthropic.AsyncAnthropic, i: int) -> tuple[str, list[Any]]:
        events = [chat_chunk(f"s{i}-{j} ") for j in range(20)]
        events += [tool_chunk(0, f"call_{i}", f"tool_{i}", f'{{"n": {i}}}'),
                   chat_chunk(finish="tool_calls")]
        async with aclient.messages.stream(model="scripted", max_tokens=64,
                                           messages=script(*events)) as reader:
            final = await reader.get_final_message()
        text = "".join(b.text for b in final.content if b.type == "text")
        return text, [(b.id, b.input) for b in final.content if b.type == "tool_use"]

    async def run() -> list[tuple[str, list[Any]]]:
        async with async_client(door) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(12)))

    for i, (text, calls) in enumerate(asyncio.run(run())):
        assert text == "".join(f"s{i}-{j} " for j in range(20))
        assert calls == [(f"call_{i}", {"n": i})]


# Refusals, in Anthropic's shape.

def refusal(door: Sidecar, body: dict[str, Any], status: int = 400) -> dict[str, Any]:
    reply = httpx.post(door.url + "/v1/messages", timeout=10, json=body)
    assert reply.status_code == status, reply.text
    found: dict[str, Any] = reply.json()
    assert found["type"] == "error"
    error: dict[str, Any] = found["error"]
    return error


def test_a_tool_name_over_64_characters_is_refused_naming_it(door: Sidecar) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client(door).messages.create(model="gpt-test", max_tokens=8, messages=said("hi"),
                                     tools=[{"name": "t" * 65, "input_schema": {}}])
    body: Any = caught.value.body
    assert body["error"]["type"] == "invalid_request_error"
    assert "tools[0].name" in body["error"]["message"]


@pytest.mark.parametrize(("field", "path"), [
    ({"mcp_servers": [{"type": "url", "url": "http://127.0.0.1:9/", "name": "x"}]},
     "mcp_servers"),
    ({"metadata": {"x-api-key": "sk-other"}}, "metadata.x-api-key"),
    ({"base_url": "http://127.0.0.1:9/"}, "base_url")])
def test_a_field_that_would_redirect_the_request_is_forbidden(
        door: Sidecar, claude: AnthropicMock, field: dict[str, Any], path: str) -> None:
    claude.reset()
    error = refusal(door, {"model": "claude", "max_tokens": 8, "messages": said("hi"),
                           **field})
    assert error["type"] == "invalid_request_error"
    assert f"`{path}`" in error["message"]
    assert claude.requests == []


def test_max_tokens_is_required_as_anthropic_requires_it(door: Sidecar) -> None:
    error = refusal(door, {"model": "claude", "messages": said("hi")})
    assert error["message"] == "Missing required parameter: `max_tokens`."


def test_an_unknown_model_is_a_404_not_found_error(door: Sidecar) -> None:
    error = refusal(door, {"model": "nope", "max_tokens": 8, "messages": said("hi")}, 404)
    assert error["type"] == "not_found_error"
    assert "nope" in error["message"]


def test_a_body_that_is_not_json_is_refused_in_anthropics_shape(door: Sidecar) -> None:
    reply = httpx.post(door.url + "/v1/messages", content=b"{not json",
                       headers={"Content-Type": "application/json"})
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"


def test_a_server_tool_cannot_go_to_an_openai_target(door: Sidecar) -> None:
    error = refusal(door, {"model": "gpt-test", "max_tokens": 8, "messages": said("hi"),
                           "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
    assert "tools[0]" in error["message"]


def test_openai_errors_stay_openai_shaped_on_the_openai_door(door: Sidecar) -> None:
    reply = httpx.post(door.url + "/v1/chat/completions", json={"model": "nope",
                                                                "messages": said("hi")})
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "model_not_found"


def test_a_malformed_openai_chunk_never_breaks_the_messages_stream(door: Sidecar) -> None:
    # Tool calls that are not objects, an index that is not a number, usage in words.
    bad = orjson.dumps({
        "id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "s",
        "choices": [{"index": 0, "delta": {"tool_calls": [5, {"index": "a"}]},
                     "finish_reason": None}],
        "usage": {"prompt_tokens": "many", "completion_tokens": -3}}).decode()
    events = stream(door, script(chat_chunk("Hi"), bad, chat_chunk(finish="stop")))
    assert [name for name, _ in events][-1] == "message_stop"
    text = "".join(data["delta"].get("text", "") for name, data in events
                   if name == "content_block_delta")
    assert text == "Hi"


# Bodies a hostile client sends, on a door whose target speaks another protocol: each was a
# 500 from the translation (KeyError, TypeError, AttributeError), and is the door's 400.
TOOL: Any = {"type": "function", "function": {"name": "f", "parameters": {}}}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/messages", {"model": "gpt-test", "max_tokens": 8, "messages": [
        {"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    ("/v1/messages/count_tokens", {"model": "gpt-test", "messages": [
        {"role": "user", "content": [{"type": "text", "text": 7}]}]},
     "messages[0].content[0].text"),
    ("/v1/chat/completions", {"model": "claude", "messages": said("hi"), "tools": [TOOL],
                              "tool_choice": 1}, "tool_choice"),
    ("/v1/chat/completions", {"model": "claude", "messages": said("hi"), "tools": 1},
     "tools"),
    ("/v1/chat/completions", {"model": "claude", "messages": [
        {"role": "assistant", "content": "x", "tool_calls": 1.5}]}, "messages[0].tool_calls"),
    ("/v1/responses", {"model": "claude", "input": "hi", "tools": 1}, "tools"),
    ("/v1/responses", {"model": "gpt-test", "input": "hi", "tools": True}, "tools"),
])
def test_a_malformed_field_read_by_a_translation_is_a_400_in_the_doors_shape(
        door: Sidecar, path: str, body: dict[str, Any], param: str) -> None:
    reply = httpx.post(door.url + path, timeout=10, json=body)
    assert reply.status_code == 400, reply.text
    found = reply.json()
    if path.startswith("/v1/messages"):
        assert found["type"] == "error"
        assert found["error"]["type"] == "invalid_request_error"
        assert f"`{param}`" in found["error"]["message"]
    else:
        assert found["error"]["type"] == "invalid_request_error"
        assert found["error"]["param"] == param
    assert "unhandled error" not in door.logs()


def test_a_count_reads_a_max_tokens_that_is_not_a_count_as_none(door: Sidecar) -> None:
    # count_tokens does not declare max_tokens: a string there was a 500 on an OpenAI target.
    reply = httpx.post(door.url + "/v1/messages/count_tokens", timeout=10, json={
        "model": "gpt-test", "max_tokens": "many", "messages": said("hi")})
    assert reply.status_code == 200, reply.text
    assert reply.json()["input_tokens"] > 0


def test_tool_call_arguments_nested_past_what_the_encoder_writes_are_not_a_500(
        door: Sidecar) -> None:
    # The body's own depth is checked at the door, but arguments are a string: the
    # translation parses them, and orjson reads 1,024 levels where it writes only 254. The
    # Anthropic body built from them could not be written (TypeError: a 500).
    deep = '{"a":' * 300 + "1" + "}" * 300
    reply = httpx.post(door.url + "/v1/chat/completions", timeout=10, json={
        "model": "claude", "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "f", "arguments": deep}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"}],
        "tools": [TOOL]})
    assert reply.status_code != 500, reply.text
    assert "unhandled error" not in door.logs()
