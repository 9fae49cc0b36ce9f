"""The Anthropic front door with the official `anthropic` client, through the sidecar as a real
process: answered by a Messages upstream on loopback (bytes passed through), by an
OpenAI-compatible one (translated), across a fallback between the two, and from the cache in
the door's protocol."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from tests.support.anthropic_mock import ANTHROPIC_KEY, VERSION, AnthropicMock
from tests.support.messages_door import (
    async_client,
    client,
    said,
    sse_events,
    start_door,
    steer,
)
from tests.support.scripted_upstream import ScriptedUpstream
from tests.support.sidecar import Sidecar
from tests.support.upstream_mock import MockUpstream

WEATHER: Any = [{"name": "weather", "description": "The weather in a city.",
                 "input_schema": {"type": "object",
                                  "properties": {"city": {"type": "string"}}}}]


@pytest.fixture(scope="module")
def claude_server() -> Iterator[AnthropicMock]:
    server = AnthropicMock()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def claude(claude_server: AnthropicMock) -> AnthropicMock:
    claude_server.reset()
    return claude_server


@pytest.fixture(scope="module")
def door(claude_server: AnthropicMock, scripted: ScriptedUpstream, mock_upstream: MockUpstream,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    instance = start_door(mock_upstream, claude_server, scripted,
                          tmp_path_factory.mktemp("door"))
    yield instance
    instance.stop()


# Anthropic in, Anthropic out: the client's bytes, only `model` rewritten.

def test_a_message_passes_through_with_only_the_model_rewritten(
        door: Sidecar, claude: AnthropicMock) -> None:
    reply = client(door).messages.with_raw_response.create(
        model="claude", max_tokens=64, messages=said("hello there"),
        system="Be brief.", metadata={"user_id": "u-1"}, stop_sequences=["END"])
    message = reply.parse()
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: hello there"
    assert message.id == "msg_mock01"
    assert message.usage.cache_read_input_tokens == 7
    assert reply.headers["x-sidecar-target"] == "claude/claude-test"
    seen = claude.requests[-1]
    assert seen.body == {"model": "claude-test", "max_tokens": 64, "messages": said("hello there"),
                         "system": "Be brief.", "metadata": {"user_id": "u-1"},
                         "stop_sequences": ["END"]}
    assert seen.headers["x-api-key"] == ANTHROPIC_KEY  # the operator's, not the client's
    assert seen.headers["anthropic-version"] == VERSION


def test_a_stream_passes_every_event_through_named_and_ends_with_message_stop(
        door: Sidecar, claude: AnthropicMock) -> None:
    reply = httpx.post(door.url + "/v1/messages", timeout=10, json={
        "model": "claude", "max_tokens": 64, "stream": True,
        "messages": steer(thinking=True, text="one two")})
    assert reply.status_code == 200, reply.text
    events = sse_events(reply.text)
    assert all(name == data["type"] for name, data in events)
    assert [name for name, _ in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "content_block_start",
        "content_block_delta", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop"]
    assert events[3][1]["delta"]["type"] == "thinking_delta"  # not lost on the way


def test_the_stream_helper_spells_the_text_and_the_final_message(
        door: Sidecar, claude: AnthropicMock) -> None:
    with client(door).messages.stream(model="claude", max_tokens=64,
                                      messages=said("tell me more")) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == "echo: tell me more"
    assert len(pieces) > 1
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 11


def test_the_async_client_creates_and_streams(door: Sidecar, claude: AnthropicMock) -> None:
    async def run() -> tuple[str, str]:
        async with async_client(door) as aclient:
            whole = await aclient.messages.create(model="claude", max_tokens=32,
                                                  messages=said("async one"))
            async with aclient.messages.stream(model="claude", max_tokens=32,
                                               messages=said("async two")) as stream:
                text = await stream.get_final_text()
        assert whole.content[0].type == "text"
        return whole.content[0].text, text

    assert asyncio.run(run()) == ("echo: async one", "echo: async two")


def test_a_two_turn_tool_loop_passes_tool_use_and_results(door: Sidecar,
                                                          claude: AnthropicMock) -> None:
    anthropic_client = client(door)
    turns: list[Any] = steer(tools=2)
    with anthropic_client.messages.stream(model="claude", max_tokens=64, tools=WEATHER,
                                          messages=turns) as stream:
        first = stream.get_final_message()
    calls = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use"
    assert [(c.id, c.input) for c in calls] == [("toolu_0", {"city": "Oslo", "n": 0}),
                                                 ("toolu_1", {"city": "Lima", "n": 1})]
    turns = [*turns, {"role": "assistant", "content": first.content},
             {"role": "user", "content": [
                 {"type": "tool_result", "tool_use_id": c.id, "content": f"sunny {i}"}
                 for i, c in enumerate(calls)]}]
    second = anthropic_client.messages.create(model="claude", max_tokens=64, tools=WEATHER,
                                              messages=turns)
    assert second.content[0].type == "text"
    assert second.content[0].text == "echo: result sunny 1"
    assert claude.requests[-1].body["messages"][2]["content"][0]["tool_use_id"] == "toolu_0"


def test_count_tokens_asks_the_anthropic_upstream(door: Sidecar, claude: AnthropicMock) -> None:
    counted = client(door).messages.count_tokens(model="claude", messages=said("count me"))
    seen = claude.requests[-1]
    assert seen.path == "/v1/messages/count_tokens"
    assert seen.body["model"] == "claude-test"
    assert counted.input_tokens > 0


def test_an_upstream_400_comes_back_in_anthropics_shape(door: Sidecar,
                                                        claude: AnthropicMock) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client(door).messages.create(model="claude", max_tokens=8, messages=steer(
            status=400, type="invalid_request_error"))
    body: Any = caught.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == "mock error"


def test_the_provider_key_never_appears_in_an_error_or_the_log(
        door: Sidecar, claude: AnthropicMock) -> None:
    for stream in (False, True):
        reply = httpx.post(door.url + "/v1/messages", timeout=10, json={
            "model": "claude", "max_tokens": 8, "stream": stream,
            "messages": steer(status=400, echo_key=True)})
        assert reply.status_code == 400
        assert "mock error for key" in reply.text
        assert ANTHROPIC_KEY not in reply.text
    assert ANTHROPIC_KEY not in door.logs()


# Fallback crosses protocols before the first byte.

def test_an_overloaded_anthropic_target_falls_back_to_an_openai_one(
        door: Sidecar, claude: AnthropicMock) -> None:
    reply = client(door).messages.with_raw_response.create(
        model="claude-then-openai", max_tokens=16,
        messages=steer(status=529, type="overloaded_error", key="fall"))
    message = reply.parse()
    assert reply.headers["x-sidecar-target"] == "mock/mock-gpt"
    assert reply.headers["x-sidecar-fallback-from"] == "claude/claude-test"
    assert message.content[0].type == "text"
    assert message.content[0].text.startswith("Hello from mock: mock:")
    assert claude.count("fall") == 2  # tried, retried once, then the other protocol


def test_an_error_event_before_the_first_word_lets_the_openai_target_answer(
        door: Sidecar, claude: AnthropicMock) -> None:
    with client(door).messages.stream(model="claude-then-openai", max_tokens=16,
                                      messages=steer(error_first=True)) as stream:
        text = stream.get_final_text()
    assert text.startswith("Hello from mock: mock:")


def test_a_stream_that_breaks_ends_with_an_error_event_and_no_message_stop(
        door: Sidecar, claude: AnthropicMock) -> None:
    reply = httpx.post(door.url + "/v1/messages", timeout=10, json={
        "model": "claude", "max_tokens": 64, "stream": True,
        "messages": steer(text="a b c d e f", break_after=5)})
    events = sse_events(reply.text)
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "api_error"
    assert "message_stop" not in [name for name, _ in events]
    with pytest.raises(anthropic.APIStatusError), client(door).messages.stream(
            model="claude", max_tokens=64,
            messages=steer(text="a b c d e f", break_after=5)) as stream:
        stream.get_final_message()


# Anthropic in, an OpenAI-compatible target out: translated both ways.

def test_a_message_to_an_openai_target_is_translated_both_ways(
        door: Sidecar, upstream: MockUpstream) -> None:
    message = client(door).messages.create(
        model="gpt-test", max_tokens=40, system="Be brief.", stop_sequences=["END", "  "],
        metadata={"user_id": "u-7"}, messages=said("translate me"),
        extra_body={"temperature": 0.5})  # a field this client release no longer names
    assert message.type == "message"
    assert message.content[0].type == "text"
    assert message.content[0].text == "Hello from mock: translate me"
    assert message.stop_reason == "end_turn"
    assert message.model == "mock-gpt"
    assert message.usage.output_tokens == 5
    sent = upstream.requests[-1].body
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "translate me"}]
    assert (sent["max_tokens"], sent["temperature"], sent["user"]) == (40, 0.5, "u-7")
    assert sent["stop"] == ["END", "  "]


def test_a_stream_from_an_openai_target_is_anthropics_event_sequence(
        door: Sidecar, upstream: MockUpstream) -> None:
    reply = httpx.post(door.url + "/v1/messages", timeout=10, json={
        "model": "gpt-test", "max_tokens": 64, "stream": True,
        "messages": said("stream this")})
    events = sse_events(reply.text)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    text = "".join(data["delta"]["text"] for name, data in events
                   if name == "content_block_delta")
    assert text == "Hello from mock: stream this"
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"]["output_tokens"] == 5  # usage asked for, and passed on
    assert upstream.requests[-1].body["stream_options"] == {"include_usage": True}


def test_a_tool_loop_with_an_openai_target(door: Sidecar, upstream: MockUpstream) -> None:
    anthropic_client = client(door)
    turns: list[Any] = said("weather?")
    with anthropic_client.messages.stream(model="gpt-test", max_tokens=64, tools=WEATHER,
                                          messages=turns) as stream:
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use"
    call = first.content[0]
    assert call.type == "tool_use"
    assert (call.id, call.name, call.input) == ("call_mock1", "weather", {"location": "Paris"})
    assert upstream.requests[-1].body["tools"][0]["function"]["parameters"] == \
        WEATHER[0]["input_schema"]
    turns = [*turns, {"role": "assistant", "content": first.content},
             {"role": "user", "content": [
                 {"type": "tool_result", "tool_use_id": call.id, "content": "sunny"},
                 {"type": "text", "text": "and tomorrow?"}]}]
    second = anthropic_client.messages.create(model="gpt-test", max_tokens=64,
                                              tool_choice={"type": "none"}, tools=WEATHER,
                                              messages=turns)
    assert second.content[0].type == "text"
    sent = upstream.requests[-1].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_mock1"
    assert sent[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_mock1"}
    assert sent[3] == {"role": "user", "content": "and tomorrow?"}


def test_count_tokens_for_an_openai_target_is_the_sidecars_estimate(
        door: Sidecar, upstream: MockUpstream) -> None:
    short = client(door).messages.count_tokens(model="gpt-test", messages=said("x"))
    long = client(door).messages.count_tokens(model="gpt-test", messages=said("x" * 4000))
    assert 0 < short.input_tokens < 20
    assert 1000 <= long.input_tokens <= 1100
    assert upstream.requests == []  # OpenAI's API has no count to ask


# The cache answers in the door's protocol.

@pytest.mark.parametrize("model", ["gpt-test", "claude"])
def test_a_cached_message_replays_in_anthropics_shape(door: Sidecar, upstream: MockUpstream,
                                                      claude: AnthropicMock, model: str) -> None:
    ask: Any = {"model": model, "max_tokens": 16, "extra_body": {"temperature": 0},
                "messages": said(f"cache me {model}")}
    first = client(door).messages.with_raw_response.create(**ask)
    again = client(door).messages.with_raw_response.create(**ask)
    assert (first.headers["x-sidecar-cache"], again.headers["x-sidecar-cache"]) == ("miss",
                                                                                    "hit")
    assert again.parse() == first.parse()
    assert len(upstream.requests) + len(claude.requests) == 1


@pytest.mark.parametrize("model", ["gpt-test", "claude"])
def test_a_cached_stream_replays_as_anthropic_events(door: Sidecar, upstream: MockUpstream,
                                                     claude: AnthropicMock, model: str) -> None:
    ask = {"model": model, "max_tokens": 16, "temperature": 0, "stream": True,
           "messages": said(f"stream and cache {model}")}
    first = httpx.post(door.url + "/v1/messages", json=ask, timeout=10)
    again = httpx.post(door.url + "/v1/messages", json=ask, timeout=10)
    assert again.headers["x-sidecar-cache"] == "hit"
    assert sse_events(again.text) == sse_events(first.text)
    assert sse_events(again.text)[-1][0] == "message_stop"
    with client(door).messages.stream(
            model=model, max_tokens=16, extra_body={"temperature": 0},
            messages=said(f"stream and cache {model}")) as stream:
        assert stream.get_final_text().endswith(f"stream and cache {model}")
    assert len(upstream.requests) + len(claude.requests) == 1


def test_a_client_that_leaves_a_stream_cancels_the_upstream_request(
        door: Sidecar, claude: AnthropicMock) -> None:
    with client(door).messages.stream(model="claude", max_tokens=64, messages=steer(
            text=" ".join(["word"] * 50), delay_s=0.1)) as reader:
        for _ in reader.text_stream:
            break  # the first words, then away
    assert claude.aborted.wait(5)


def test_a_kept_message_answers_a_stream_and_a_kept_stream_a_message(
        door: Sidecar, upstream: MockUpstream, claude: AnthropicMock) -> None:
    ask: Any = {"model": "claude", "max_tokens": 16, "temperature": 0,
                "messages": said("either way round")}
    whole = httpx.post(door.url + "/v1/messages", json=ask, timeout=10).json()
    replayed = httpx.post(door.url + "/v1/messages", json={**ask, "stream": True}, timeout=10)
    assert replayed.headers["x-sidecar-cache"] == "hit"
    events = sse_events(replayed.text)
    assert [name for name, _ in events][:2] == ["message_start", "content_block_start"]
    assert events[-1][0] == "message_stop"
    text = "".join(data["delta"]["text"] for name, data in events
                   if name == "content_block_delta")
    assert text == whole["content"][0]["text"]
    streamed = {**ask, "messages": said("the other way round"), "stream": True}
    httpx.post(door.url + "/v1/messages", json=streamed, timeout=10)
    message = client(door).messages.with_raw_response.create(
        model="claude", max_tokens=16, extra_body={"temperature": 0},
        messages=said("the other way round"))
    assert message.headers["x-sidecar-cache"] == "hit"
    kept = message.parse()
    assert kept.content[0].type == "text"
    assert kept.content[0].text == "echo: the other way round"
    assert kept.id == "msg_mock01"
    assert len(claude.requests) == 2


def test_the_metrics_count_this_doors_requests_apart(door: Sidecar, claude: AnthropicMock
                                                     ) -> None:
    client(door).messages.create(model="claude", max_tokens=8, messages=said("metered"))
    client(door).messages.count_tokens(model="claude", messages=said("metered"))
    text = httpx.get(door.url + "/metrics", timeout=10).text
    lines = [line for line in text.splitlines()
             if line.startswith("llm_sidecar_requests_total{") and 'front_door="anthropic"' in line]
    operations = {line.split('operation="')[1].split('"')[0] for line in lines}
    assert operations == {"chat", "count_tokens"}
