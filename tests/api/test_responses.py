"""`POST /v1/responses` with the `openai` SDK's `client.responses.create` against the app on
loopback: passed through as bytes to an upstream that serves Responses, translated for a
chat-only upstream and for Anthropic, JSON and stream, a tool call round trip, and the
stateful fields refused by name where the target keeps no state."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.support.anthropic_mock import ANTHROPIC_KEY, AnthropicMock
from tests.support.in_process import no_blocking, serving
from tests.support.responses_mock import ResponsesUpstream
from tests.support.upstream_mock import MockUpstream
from tests.support.websockets import make_app

WEATHER: Any = [{"type": "function", "name": "weather", "description": "The weather.",
                 "parameters": {"type": "object",
                                "properties": {"location": {"type": "string"}}}}]


@pytest.fixture(scope="module")
def responses_upstream() -> Iterator[ResponsesUpstream]:
    server = ResponsesUpstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def sdk(upstream: MockUpstream, responses_upstream: ResponsesUpstream,
              claude: AnthropicMock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
              ) -> AsyncIterator[openai.AsyncOpenAI]:
    monkeypatch.setenv("ANTHROPIC_TEST_KEY", ANTHROPIC_KEY)
    responses_upstream.bodies.clear()
    app = make_app(upstream, tmp_path, monkeypatch, extra=f"""
[providers.resp]
kind = "openai"
base_url = "{responses_upstream.base_url}"
responses = true

[providers.claude]
kind = "anthropic"
base_url = "{claude.base_url}"
api_key_env = "ANTHROPIC_TEST_KEY"

[models."resp"]
targets = [ {{ provider = "resp", model = "resp-upstream" }} ]

[models."claude"]
targets = [ {{ provider = "claude", model = "claude-test" }} ]
""")
    async with serving(app) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        yield client
        await client.close()


async def test_a_responses_upstream_gets_the_clients_bytes_with_only_the_model_rewritten(
        sdk: openai.AsyncOpenAI, responses_upstream: ResponsesUpstream) -> None:
    with no_blocking():
        response = await sdk.responses.create(model="resp", input="hi there",
                                              instructions="Be brief.", store=False)
    assert response.output_text == "upstream says: hi there"
    assert response.id == "resp_upstream"
    assert response.usage is not None and response.usage.total_tokens == 8
    sent = orjson.loads(responses_upstream.bodies[-1])
    assert sent == {"model": "resp-upstream", "input": "hi there",
                    "instructions": "Be brief.", "store": False}


async def test_a_responses_upstreams_stream_passes_through(
        sdk: openai.AsyncOpenAI, responses_upstream: ResponsesUpstream) -> None:
    stream = await sdk.responses.create(model="resp", input="streamed", stream=True)
    events = [event async for event in stream]
    assert [e.type for e in events] == ["response.created", "response.output_text.delta",
                                        "response.completed"]
    assert events[1].delta == "upstream says: streamed"  # type: ignore[union-attr]
    assert orjson.loads(responses_upstream.bodies[-1])["model"] == "resp-upstream"


async def test_a_chat_only_upstream_answers_a_translated_response(
        sdk: openai.AsyncOpenAI, upstream: MockUpstream) -> None:
    response = await sdk.responses.create(
        model="gpt-test", instructions="Be brief.", max_output_tokens=50, temperature=0.5,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "hello"}]}])
    assert response.object == "response"
    assert response.status == "completed"
    assert response.output_text == "Hello from mock: hello"
    assert response.usage is not None and response.usage.output_tokens > 0
    sent = upstream.requests[-1].body
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hello"}]
    assert sent["max_tokens"] == 50 and sent["temperature"] == 0.5


async def test_a_translated_stream_has_the_responses_event_sequence(
        sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.responses.create(model="gpt-test", input="stream me", stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1  # word by word, as the upstream's chunks came
    assert "".join(deltas) == "Hello from mock: stream me"
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    completed = events[-1].response  # type: ignore[union-attr]
    assert completed.output_text == "Hello from mock: stream me"
    assert completed.usage is not None and completed.usage.input_tokens > 0


async def test_a_tool_call_round_trip_through_a_chat_only_upstream(
        sdk: openai.AsyncOpenAI, upstream: MockUpstream) -> None:
    first = await sdk.responses.create(model="gpt-test", input="weather in Paris?",
                                       tools=WEATHER)
    call = first.output[0]
    assert call.type == "function_call"
    assert call.name == "weather" and call.arguments == '{"location": "Paris"}'
    assert call.call_id == "call_mock1"
    second = await sdk.responses.create(model="gpt-test", tools=WEATHER, tool_choice="none",
                                        input=[{"role": "user", "content": "weather in Paris?"},
                                               {"type": "function_call", "call_id": call.call_id,
                                                "name": call.name, "arguments": call.arguments},
                                               {"type": "function_call_output",
                                                "call_id": call.call_id, "output": "sunny"}])
    assert second.output_text == "Hello from mock: sunny"
    messages = upstream.requests[-1].body["messages"]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "weather",
                                                        "arguments": '{"location": "Paris"}'}
    assert messages[2] == {"role": "tool", "tool_call_id": "call_mock1", "content": "sunny"}


async def test_anthropic_answers_a_translated_response_whole_and_streamed(
        sdk: openai.AsyncOpenAI, claude: AnthropicMock) -> None:
    response = await sdk.responses.create(model="claude", input="hello there")
    assert response.output_text == "echo: hello there"
    assert response.usage is not None and response.usage.input_tokens > 0
    stream = await sdk.responses.create(model="claude", input="hello there", stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "echo: hello there"  # type: ignore[union-attr]


@pytest.mark.parametrize(("field", "value"), [("previous_response_id", "resp_1"),
                                              ("store", True)])
async def test_state_the_target_cannot_keep_is_refused_by_name(
        sdk: openai.AsyncOpenAI, upstream: MockUpstream, field: str, value: object) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.responses.create(model="gpt-test", input="x", extra_body={field: value})
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    assert upstream.requests == []


async def test_state_an_upstream_keeps_reaches_it_untouched(
        sdk: openai.AsyncOpenAI, responses_upstream: ResponsesUpstream) -> None:
    # An upstream that serves Responses keeps the conversation: the fields that name it go on.
    await sdk.responses.create(model="resp", input="and then?", store=True,
                               previous_response_id="resp_earlier")
    sent = orjson.loads(responses_upstream.bodies[-1])
    assert sent == {"model": "resp-upstream", "input": "and then?", "store": True,
                    "previous_response_id": "resp_earlier"}
