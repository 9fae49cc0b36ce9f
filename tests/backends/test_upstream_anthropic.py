"""Claude behind the OpenAI API: the official `openai` client, through the sidecar as a real
process, to a fake Anthropic upstream on loopback that speaks the Messages wire format."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.support.anthropic_mock import ANTHROPIC_KEY, AnthropicMock
from tests.support.sidecar import QUIET_ROUTING, Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

WEATHER: Any = [{"type": "function", "function": {
    "name": "weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def providers(anthropic: AnthropicMock) -> str:
    return f"""
[providers.claude]
kind = "anthropic"
base_url = "{anthropic.base_url}"
api_key_env = "ANTHROPIC_TEST_KEY"
timeout_connect_s = 2
timeout_read_s = 1.5
max_retries = 2
max_retry_wait_s = 3

[models."claude"]
targets = [ {{ provider = "claude", model = "claude-test" }} ]

[models."claude-then-openai"]
targets = [ {{ provider = "claude", model = "claude-test", weight = 1 }},
            {{ provider = "mock", model = "mock-gpt", weight = 0, fallback_only = true }} ]

[models."openai-then-claude"]
targets = [ {{ provider = "mock", model = "mock-gpt", weight = 1 }},
            {{ provider = "claude", model = "claude-test", weight = 0, fallback_only = true }} ]
"""


@pytest.fixture(scope="module")
def anthropic_server() -> Iterator[AnthropicMock]:
    server = AnthropicMock()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def anthropic(anthropic_server: AnthropicMock) -> AnthropicMock:
    anthropic_server.reset()
    return anthropic_server


@pytest.fixture(scope="module")
def claude(anthropic_server: AnthropicMock, mock_upstream: MockUpstream,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    instance = start_sidecar(base_config(mock_upstream, extra=providers(anthropic_server)),
                             tmp_path_factory.mktemp("claude"),
                             env={"ANTHROPIC_TEST_KEY": ANTHROPIC_KEY})
    yield instance
    instance.stop()


def ask(text: str) -> Any:
    return [{"role": "user", "content": text}]


def steer(**directives: object) -> Any:
    return ask("mock:" + orjson.dumps(directives).decode())


def post(claude: Sidecar, **body: object) -> httpx.Response:
    return httpx.post(claude.base_url + "/chat/completions", timeout=30,
                      json={"model": "claude", **body})


def test_a_chat_answer_comes_back_in_openai_shape(claude: Sidecar,
                                                   anthropic: AnthropicMock) -> None:
    reply = claude.client().chat.completions.create(model="claude", messages=[
        {"role": "system", "content": "be brief"}, *ask("hello")])
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.content == "echo: hello"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "claude-test"
    (seen,) = anthropic.requests
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == ANTHROPIC_KEY
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in seen.headers
    assert seen.body["system"] == "be brief" and seen.body["max_tokens"] == 4096
    assert seen.body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "hello"}]}]


def test_usage_counts_cache_reads_and_writes_in_the_prompt(claude: Sidecar,
                                                           anthropic: AnthropicMock) -> None:
    reply = claude.client().chat.completions.create(
        model="claude", messages=steer(usage={"output_tokens": 4}))
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
            reply.usage.total_tokens) == (11 + 7 + 5, 4, 27)
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 7


def test_a_streamed_answer_arrives_as_openai_chunks_with_usage_last(
        claude: Sidecar, anthropic: AnthropicMock) -> None:
    chunks = list(claude.client().chat.completions.create(
        model="claude", messages=steer(text="one two three", usage={"output_tokens": 3}),
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 23 and chunks[-1].usage.completion_tokens == 3
    assert anthropic.requests[0].body["stream"] is True


def test_text_that_quotes_message_stop_does_not_end_the_stream(claude: Sidecar,
                                                               anthropic: AnthropicMock) -> None:
    said = 'the event "message_stop" ends it'
    chunks = list(claude.client().chat.completions.create(
        model="claude", messages=steer(text=said), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == said


def test_a_stream_without_include_usage_sends_no_usage_chunk(claude: Sidecar,
                                                             anthropic: AnthropicMock) -> None:
    chunks = list(claude.client().chat.completions.create(
        model="claude", messages=ask("hi"), stream=True))
    assert all(c.choices and c.usage is None for c in chunks)


def test_two_parallel_tool_calls_stream_with_indices_0_and_1_and_separate_arguments(
        claude: Sidecar, anthropic: AnthropicMock) -> None:
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in claude.client().chat.completions.create(
            model="claude", messages=steer(tools=2), tools=WEATHER,
            stream=True):
        for delta in chunk.choices[0].delta.tool_calls or ():
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            assert delta.function is not None
            call["id"] += delta.id or ""
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert sorted(calls) == [0, 1]  # tool indices, not Anthropic's block indices 1 and 2
    assert calls[0] == {"id": "toolu_0", "name": "weather",
                        "arguments": '{"city":"Oslo","n":0}'}
    assert calls[1] == {"id": "toolu_1", "name": "weather",
                        "arguments": '{"city":"Lima","n":1}'}
    assert finish == "tool_calls"


def test_a_two_turn_tool_loop_sends_tool_use_and_results_back(claude: Sidecar,
                                                              anthropic: AnthropicMock) -> None:
    client = claude.client()
    messages: list[Any] = steer(tools=2)
    first = client.chat.completions.create(model="claude", messages=messages, tools=WEATHER,
                                           tool_choice="required", parallel_tool_calls=False)
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me look."
    assert message.tool_calls is not None
    assert [c.function.arguments for c in message.tool_calls  # type: ignore[union-attr]
            ] == [
        '{"city":"Oslo","n":0}', '{"city":"Lima","n":1}']
    messages.append(message.model_dump(exclude_none=True))
    messages += [{"role": "tool", "tool_call_id": c.id, "content": f"cold in {i}"}
                 for i, c in enumerate(message.tool_calls)]
    second = client.chat.completions.create(model="claude", messages=messages, tools=WEATHER)
    assert second.choices[0].message.content == "echo: result cold in 1"
    sent = anthropic.requests[0].body
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert sent["tools"] == [{"name": "weather", "description": "The weather in a city.",
                              "input_schema": WEATHER[0]["function"]["parameters"]}]
    turns = anthropic.requests[1].body["messages"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_0", "name": "weather",
         "input": {"city": "Oslo", "n": 0}},
        {"type": "tool_use", "id": "toolu_1", "name": "weather",
         "input": {"city": "Lima", "n": 1}}]
    assert turns[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_0", "content": "cold in 0"},
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "cold in 1"}]


@pytest.mark.parametrize(("reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter")])
@pytest.mark.parametrize("stream", [False, True])
def test_stop_reasons_become_openai_finish_reasons(claude: Sidecar, anthropic: AnthropicMock,
                                                   reason: str, finish: str,
                                                   stream: bool) -> None:
    client = claude.client()
    messages: Any = steer(stop_reason=reason)
    if stream:
        chunks = list(client.chat.completions.create(model="claude", messages=messages,
                                                     stream=True))
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [
            finish]
    else:
        reply = client.chat.completions.create(model="claude", messages=messages)
        assert reply.choices[0].finish_reason == finish


def test_images_reach_anthropic_as_image_blocks(claude: Sidecar,
                                                anthropic: AnthropicMock) -> None:
    claude.client().chat.completions.create(model="claude", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what are these?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}])
    assert anthropic.requests[0].body["messages"][0]["content"] == [
        {"type": "text", "text": "what are these?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]


def test_thinking_is_not_passed_on(claude: Sidecar, anthropic: AnthropicMock) -> None:
    client = claude.client()
    reply = client.chat.completions.create(model="claude", messages=steer(
        thinking=True, text="answer"))
    assert reply.choices[0].message.content == "answer"
    chunks = list(client.chat.completions.create(model="claude", messages=steer(
        thinking=True, text="answer"), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "answer"


def test_an_anthropic_error_comes_back_in_openai_shape(claude: Sidecar,
                                                       anthropic: AnthropicMock) -> None:
    response = post(claude, messages=steer(status=400, type="invalid_request_error"))
    assert response.status_code == 400
    assert response.json() == {"error": {"message": "mock error", "type": "invalid_request_error",
                                         "param": None, "code": None}}


def test_a_529_is_retried_before_the_first_byte(claude: Sidecar,
                                                anthropic: AnthropicMock) -> None:
    reply = claude.client().chat.completions.create(model="claude", messages=steer(
        status=529, type="overloaded_error", fail_first=1, key="once", retry_after=0))
    assert (reply.choices[0].message.content or "").startswith("echo: mock:")
    assert anthropic.count("once") == 2


def test_a_529_that_outlasts_the_retries_is_a_503(claude: Sidecar,
                                                  anthropic: AnthropicMock) -> None:
    response = post(claude, messages=steer(status=529, type="overloaded_error", key="always",
                                           retry_after=0))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_unavailable"
    assert anthropic.count("always") == 3  # max_retries = 2


def test_refused_credentials_are_a_502_that_does_not_quote_the_upstream(
        claude: Sidecar, anthropic: AnthropicMock) -> None:
    response = post(claude, messages=steer(status=401, type="authentication_error",
                                           echo_key=True))
    assert response.status_code == 502
    assert "refused the sidecar's credentials" in response.json()["error"]["message"]
    assert ANTHROPIC_KEY not in response.text


def test_the_key_never_appears_in_an_error_body_or_the_log(claude: Sidecar,
                                                           anthropic: AnthropicMock) -> None:
    response = post(claude, messages=steer(status=400, type="invalid_request_error",
                                           echo_key=True))
    assert response.status_code == 400
    assert "[redacted]" in response.json()["error"]["message"]
    assert ANTHROPIC_KEY not in response.text
    assert claude.wait_for_log('"status":400')
    assert ANTHROPIC_KEY not in claude.logs()


def test_fallback_goes_from_an_anthropic_target_to_an_openai_one(
        claude: Sidecar, anthropic: AnthropicMock, upstream: MockUpstream) -> None:
    response = post(claude, model="claude-then-openai", messages=steer(
        status=529, type="overloaded_error", retry_after=0))
    assert response.status_code == 200
    assert response.headers["X-Sidecar-Target"] == "mock/mock-gpt"
    assert response.headers["X-Sidecar-Fallback-From"] == "claude/claude-test"
    assert response.json()["choices"][0]["message"]["content"].startswith("Hello from mock")


def test_fallback_goes_from_an_openai_target_to_an_anthropic_one(
        claude: Sidecar, anthropic: AnthropicMock, upstream: MockUpstream) -> None:
    response = post(claude, model="openai-then-claude", messages=ask("hi"),
                    mock={"status": 500, "retry_after": 0})
    assert response.status_code == 200
    assert response.headers["X-Sidecar-Target"] == "claude/claude-test"
    assert response.json()["choices"][0]["message"]["content"] == "echo: hi"
    assert "mock" not in anthropic.requests[0].body  # nothing untranslated goes through


def test_an_error_event_before_the_first_word_lets_another_target_answer(
        claude: Sidecar, anthropic: AnthropicMock, upstream: MockUpstream) -> None:
    with httpx.stream("POST", claude.base_url + "/chat/completions", timeout=30, json={
            "model": "claude-then-openai", "stream": True,
            "messages": steer(error_first=True)}) as response:
        raw = b"".join(response.iter_raw())
    assert response.status_code == 200
    assert response.headers["X-Sidecar-Target"] == "mock/mock-gpt"
    assert raw.endswith(b"data: [DONE]\n\n") and b"\"content\":\"Hello\"" in raw


@pytest.mark.parametrize("fault", [{"break_after": 6}, {"error_event": True},
                                   {"no_stop": True}])
def test_a_stream_that_breaks_after_the_first_byte_ends_with_an_error_event(
        claude: Sidecar, anthropic: AnthropicMock, fault: dict[str, object]) -> None:
    with httpx.stream("POST", claude.base_url + "/chat/completions", timeout=30, json={
            "model": "claude", "stream": True,
            "messages": steer(text="a b c d e f g h", **fault)}) as response:
        raw = b"".join(response.iter_raw())
    assert response.status_code == 200
    events = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert b"[DONE]" not in events
    assert b'"content":"a"' in events[1]  # text reached the client first
    error = orjson.loads(events[-1])["error"]
    assert error["type"] == "upstream_error" and error["message"]


def test_a_client_that_leaves_a_stream_cancels_the_upstream_request(
        claude: Sidecar, anthropic: AnthropicMock) -> None:
    long = " ".join(f"w{i}" for i in range(400))
    with httpx.stream("POST", claude.base_url + "/chat/completions", timeout=30, json={
            "model": "claude", "stream": True,
            "messages": steer(text=long, delay_s=0.02)}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    assert anthropic.aborted.wait(5)


def test_concurrent_streams_never_mix(claude: Sidecar, anthropic: AnthropicMock) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, dict[int, str]]:
        directives: dict[str, object] = {"delay_s": 0.005}
        if i % 2:
            directives["tools"] = i % 3 + 1
        else:
            directives["text"] = " ".join(f"s{i}w{j}" for j in range(12))
        stream = await client.chat.completions.create(
            model="claude", messages=steer(**directives), tools=WEATHER,
            stream=True)
        text, calls = "", dict[int, str]()
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            for delta in chunk.choices[0].delta.tool_calls or ():
                assert delta.function is not None
                calls[delta.index] = calls.get(delta.index, "") + (
                    delta.function.arguments or "")
        return text, calls

    async def all_of_them() -> list[tuple[str, dict[int, str]]]:
        async with claude.async_client() as client:
            return await asyncio.gather(*(one(client, i) for i in range(12)))

    for i, (text, calls) in enumerate(asyncio.run(all_of_them())):
        if i % 2:
            count = i % 3 + 1
            assert text == "Let me look." and sorted(calls) == list(range(count))
            assert [orjson.loads(calls[k])["n"] for k in range(count)] == list(range(count))
        else:
            assert text == " ".join(f"s{i}w{j}" for j in range(12)) and calls == {}


def test_a_tool_name_over_64_characters_is_refused_naming_it(claude: Sidecar,
                                                             anthropic: AnthropicMock) -> None:
    name = "x" * 65
    response = post(claude, messages=ask("hi"), tools=[
        {"type": "function", "function": {"name": name, "parameters": {}}}])
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tools[0].function.name" and "x" * 64 in error["message"]
    assert anthropic.requests == []


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format")])
def test_what_a_messages_request_cannot_carry_is_refused(
        claude: Sidecar, anthropic: AnthropicMock, body: dict[str, object], param: str) -> None:
    response = post(claude, messages=ask("hi"), **body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert anthropic.requests == []


def test_legacy_completions_on_an_anthropic_model_are_refused(claude: Sidecar,
                                                              anthropic: AnthropicMock) -> None:
    response = httpx.post(claude.base_url + "/completions", timeout=30,
                          json={"model": "claude", "prompt": "hi"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsupported_endpoint"


def test_the_probe_asks_anthropics_models_endpoint_with_the_key(
        anthropic: AnthropicMock, mock_upstream: MockUpstream, tmp_path: Path) -> None:
    routing = QUIET_ROUTING.replace("probe_interval_s = 0", "probe_interval_s = 60")
    probed = start_sidecar(base_config(mock_upstream, extra=providers(anthropic),
                                       routing=routing),
                           tmp_path, env={"ANTHROPIC_TEST_KEY": ANTHROPIC_KEY})
    try:
        deadline = time.monotonic() + 10
        while not anthropic.probes and time.monotonic() < deadline:
            time.sleep(0.02)
        (headers,) = anthropic.probes
        assert headers["x-api-key"] == ANTHROPIC_KEY
        assert headers["anthropic-version"] == "2023-06-01"
        reply = probed.client().chat.completions.create(model="claude", messages=ask("up?"))
        assert reply.choices[0].message.content == "echo: up?"  # the probe kept it in rotation
    finally:
        probed.stop()
