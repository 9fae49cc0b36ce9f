"""What an application using the official `openai` client sees through the sidecar."""

from __future__ import annotations

import gzip

import httpx
import openai
import pytest

from tests.support.sidecar import UPSTREAM_KEY, Sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi there"}]


def test_chat_completion_returns_the_upstream_answer(client: openai.OpenAI,
                                                     upstream: MockUpstream) -> None:
    reply = client.chat.completions.create(model="gpt-test", messages=USER)
    assert reply.choices[0].message.content == "Hello from mock: hi there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5


def test_model_is_rewritten_and_operator_key_sent_upstream(client: openai.OpenAI,
                                                           upstream: MockUpstream) -> None:
    client.chat.completions.create(model="gpt-test", messages=USER)
    seen = upstream.requests[-1]
    assert seen.body["model"] == "mock-gpt"
    assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "client-key" not in str(seen.headers)


def test_fields_the_sidecar_does_not_read_reach_the_upstream_unchanged(
        client: openai.OpenAI, upstream: MockUpstream) -> None:
    extra = {"logprobs": True, "top_logprobs": 2, "seed": 7, "user": "u-1", "n": 2,
             "logit_bias": {"50256": -100}, "parallel_tool_calls": False,
             "some_future_field": {"nested": [1, 2, {"x": None}]}}
    client.chat.completions.create(model="gpt-test", messages=USER,
                                   extra_body=extra)  # type: ignore[arg-type]
    body = upstream.requests[-1].body
    for key, value in extra.items():
        assert body[key] == value
    assert body["messages"] == USER


def test_image_content_parts_pass_through(client: openai.OpenAI, upstream: MockUpstream) -> None:
    parts = [{"type": "text", "text": "what is this"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=",
                                                 "detail": "low"}}]
    reply = client.chat.completions.create(model="gpt-test",
                                           messages=[{"role": "user", "content": parts}])
    assert reply.choices[0].message.content.endswith("[parts: text,image_url]")  # type: ignore[union-attr]
    assert upstream.requests[-1].body["messages"][0]["content"] == parts


def test_tools_and_tool_calls(client: openai.OpenAI, upstream: MockUpstream) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}]
    reply = client.chat.completions.create(model="gpt-test", messages=USER, tools=tools,  # type: ignore[arg-type]
                                           tool_choice="auto")
    call = reply.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert call.function.arguments == '{"location": "Paris"}'  # type: ignore[union-attr]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert upstream.requests[-1].body["tools"] == tools
    assert upstream.requests[-1].body["tool_choice"] == "auto"


def test_streamed_tool_calls(client: openai.OpenAI, upstream: MockUpstream) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    chunks = list(client.chat.completions.create(model="gpt-test", messages=USER,
                                                 tools=tools, stream=True))  # type: ignore[arg-type]
    call = chunks[0].choices[0].delta.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "lookup"  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_mode(client: openai.OpenAI, upstream: MockUpstream) -> None:
    reply = client.chat.completions.create(model="gpt-test", messages=USER,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].message.content == '{"ok": true}'
    assert upstream.requests[-1].body["response_format"] == {"type": "json_object"}


def test_stream_yields_every_token_then_ends(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="gpt-test", messages=USER, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from mock: hi there"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_with_include_usage_ends_with_a_usage_chunk(client: openai.OpenAI,
                                                           upstream: MockUpstream) -> None:
    chunks = list(client.chat.completions.create(
        model="gpt-test", messages=USER, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert upstream.requests[-1].body["stream_options"] == {"include_usage": True}


async def test_async_client_json_and_stream(sidecar: Sidecar) -> None:
    async with sidecar.async_client() as client:
        reply = await client.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        assert reply.choices[0].message.content == "Hello from mock: hi there"
        stream = await client.chat.completions.create(model="gpt-test", messages=USER,  # type: ignore[arg-type]
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "Hello from mock: hi there"


def test_sse_wire_format_is_openai_framing_with_done_last(sidecar: Sidecar) -> None:
    with httpx.stream("POST", sidecar.base_url + "/chat/completions",
                      json={"model": "gpt-test", "messages": USER, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in response.headers
        raw = b"".join(response.iter_raw())
    events = [e for e in raw.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events)
    assert events[-1] == b"data: [DONE]"
    assert raw.count(b"[DONE]") == 1


def test_sse_is_never_compressed(sidecar: Sidecar) -> None:
    with httpx.stream("POST", sidecar.base_url + "/chat/completions",
                      headers={"Accept-Encoding": "gzip"},
                      json={"model": "gpt-test", "messages": USER, "stream": True,
                            "mock": {"chunks": 300}}) as response:
        assert "content-encoding" not in response.headers
        assert b"data: [DONE]" in b"".join(response.iter_raw())


def test_legacy_completions_json_and_stream(client: openai.OpenAI, upstream: MockUpstream) -> None:
    reply = client.completions.create(model="gpt-test", prompt="say hi")
    assert reply.choices[0].text == " echo: say hi"
    assert upstream.requests[-1].path == "/v1/completions"
    assert upstream.requests[-1].body["model"] == "mock-gpt"
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="gpt-test", prompt="say hi", stream=True) if c.choices)
    assert text == " echo: say hi"


def test_embeddings_are_forwarded(client: openai.OpenAI, upstream: MockUpstream) -> None:
    result = client.embeddings.create(model="gpt-test", input=["a", "b"], dimensions=4)
    assert [d.index for d in result.data] == [0, 1]
    assert result.data[1].embedding == [0.2] * 4
    assert upstream.requests[-1].path == "/v1/embeddings"
    assert upstream.requests[-1].body["dimensions"] == 4


def test_models_lists_the_public_names(client: openai.OpenAI) -> None:
    names = {m.id for m in client.models.list()}
    assert names == {"gpt-test", "mock-gpt", "dead", "mock-429"}
    assert client.models.retrieve("gpt-test").id == "gpt-test"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_every_response_has_request_id_overhead_and_target(sidecar: Sidecar) -> None:
    response = httpx.post(sidecar.base_url + "/chat/completions",
                          json={"model": "gpt-test", "messages": USER})
    assert response.headers["x-request-id"].startswith("req_")
    assert float(response.headers["x-sidecar-overhead-ms"]) >= 0
    assert response.headers["x-sidecar-target"] == "mock/mock-gpt"
    error = httpx.post(sidecar.base_url + "/chat/completions", json={"model": "nope"})
    assert error.headers["x-request-id"].startswith("req_")
    assert "x-sidecar-overhead-ms" in error.headers


def test_client_request_id_is_kept_and_sent_upstream(sidecar: Sidecar,
                                                     upstream: MockUpstream) -> None:
    response = httpx.post(sidecar.base_url + "/chat/completions",
                          headers={"X-Request-Id": "trace-42"},
                          json={"model": "gpt-test", "messages": USER})
    assert response.headers["x-request-id"] == "trace-42"
    assert upstream.requests[-1].headers["X-Request-Id"] == "trace-42"
    odd = httpx.post(sidecar.base_url + "/chat/completions",
                     headers={"X-Request-Id": "bad id\twith spaces"},
                     json={"model": "gpt-test", "messages": USER})
    assert odd.headers["x-request-id"].startswith("req_")


def test_streams_carry_the_same_headers(sidecar: Sidecar) -> None:
    with httpx.stream("POST", sidecar.base_url + "/chat/completions",
                      json={"model": "gpt-test", "messages": USER, "stream": True}) as response:
        assert response.headers["x-request-id"].startswith("req_")
        assert float(response.headers["x-sidecar-overhead-ms"]) >= 0
        assert response.headers["x-sidecar-target"] == "mock/mock-gpt"


def test_large_json_answers_are_gzipped_when_asked(sidecar: Sidecar) -> None:
    body = {"model": "gpt-test", "input": ["x"] * 20, "dimensions": 64}
    plain = httpx.post(sidecar.base_url + "/embeddings", json=body,
                       headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    with httpx.stream("POST", sidecar.base_url + "/embeddings", json=body,
                      headers={"Accept-Encoding": "gzip"}) as zipped:
        assert zipped.headers["content-encoding"] == "gzip"
        raw = b"".join(zipped.iter_raw())
    assert len(raw) < len(plain.content)
    assert gzip.decompress(raw) == plain.content


def test_health_and_readiness(sidecar: Sidecar) -> None:
    assert httpx.get(sidecar.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(sidecar.url + "/readyz").json() == {"status": "ready"}
