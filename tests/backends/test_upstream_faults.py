"""Upstream faults: what the client sees, and that retries happen only before the first byte."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.support.sidecar import UPSTREAM_KEY, Sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]


def post(sidecar: Sidecar, mock: dict[str, object], **body: object) -> httpx.Response:
    return httpx.post(sidecar.base_url + "/chat/completions", timeout=30,
                      json={"model": "gpt-test", "messages": USER, "mock": mock, **body})


def stream_raw(sidecar: Sidecar, mock: dict[str, object]) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", sidecar.base_url + "/chat/completions", timeout=30,
                      json={"model": "gpt-test", "messages": USER, "stream": True,
                            "mock": mock}) as response:
        return response, b"".join(response.iter_raw())


def test_refused_connection_is_502_after_its_retries(client: openai.OpenAI) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="dead", messages=USER)  # type: ignore[arg-type]
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unreachable"
    assert time.monotonic() - started < 2


def test_500_then_200_is_retried_and_succeeds(sidecar: Sidecar, upstream: MockUpstream) -> None:
    response = post(sidecar, {"fail_first": 1, "status": 500, "key": "a"})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hello from mock: hi"
    assert upstream.count() == 2


def test_dropped_connection_before_an_answer_is_retried(sidecar: Sidecar,
                                                        upstream: MockUpstream) -> None:
    response = post(sidecar, {"fail_first": 1, "disconnect": True, "key": "d"})
    assert response.status_code == 200
    assert upstream.count() == 2


def test_stream_is_retried_while_no_byte_reached_the_client(sidecar: Sidecar,
                                                            upstream: MockUpstream) -> None:
    response, raw = stream_raw(sidecar, {"fail_first": 2, "status": 503, "key": "s"})
    assert response.status_code == 200
    assert raw.endswith(b"data: [DONE]\n\n")
    assert upstream.count() == 3


def test_persistent_5xx_ends_as_502_with_the_upstream_message(sidecar: Sidecar,
                                                              upstream: MockUpstream) -> None:
    response = post(sidecar, {"status": 500})
    assert response.status_code == 502
    error = response.json()["error"]
    assert "HTTP 500" in error["message"] and "mock error 500" in error["message"]
    assert upstream.count() == 3  # the first try and max_retries = 2


def test_429_retry_after_is_honoured(sidecar: Sidecar, upstream: MockUpstream) -> None:
    started = time.monotonic()
    response = post(sidecar, {"fail_first": 1, "status": 429, "retry_after": 1, "key": "r"})
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert 1.0 <= elapsed < 2.5
    assert upstream.count() == 2


def test_429_asking_for_a_long_wait_is_passed_to_the_client(client: openai.OpenAI,
                                                            upstream: MockUpstream) -> None:
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="mock-429", messages=USER,  # type: ignore[arg-type]
                                       extra_body={"mock": {"status": 429, "retry_after": 60}})
    assert time.monotonic() - started < 1
    assert caught.value.response.headers["retry-after"] == "60"
    assert upstream.count() == 1


def test_upstream_4xx_is_passed_through(client: openai.OpenAI, upstream: MockUpstream) -> None:
    error = {"message": "This model's maximum context length is 8 tokens.",
             "type": "invalid_request_error", "param": "messages",
             "code": "context_length_exceeded"}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-test", messages=USER,  # type: ignore[arg-type]
                                       extra_body={"mock": {"status": 400, "error": error}})
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "messages"
    assert "maximum context length" in caught.value.message
    assert upstream.count() == 1  # a 4xx is not retried


def test_upstream_refusing_our_key_is_502_and_quotes_nothing(sidecar: Sidecar) -> None:
    error = {"message": f"Incorrect API key provided: {UPSTREAM_KEY[:8]}...",
             "type": "invalid_request_error", "code": "invalid_api_key", "param": None}
    response = post(sidecar, {"status": 401, "error": error})
    assert response.status_code == 502
    assert UPSTREAM_KEY[:8] not in response.text
    assert "credentials" in response.json()["error"]["message"]


def test_garbage_from_the_upstream_is_502(sidecar: Sidecar) -> None:
    response = post(sidecar, {"garbage": True})
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_error"


def test_upstream_silent_past_the_idle_timeout_is_504(sidecar: Sidecar) -> None:
    started = time.monotonic()
    response = post(sidecar, {"delay_s": 5})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 4


def test_reset_mid_stream_ends_with_an_error_frame_and_no_done(sidecar: Sidecar,
                                                               upstream: MockUpstream) -> None:
    response, raw = stream_raw(sidecar, {"chunks": 10, "reset_after": 3})
    assert response.status_code == 200
    events = [e for e in raw.split(b"\n\n") if e and not e.startswith(b":")]
    assert len(events) == 4
    assert b'"error"' in events[-1]
    assert b"[DONE]" not in raw
    assert upstream.count() == 1  # no retry once the client got bytes


def test_openai_client_raises_on_a_broken_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="gpt-test", messages=USER, stream=True,  # type: ignore[arg-type]
                                            extra_body={"mock": {"chunks": 10, "reset_after": 3}})
    received = []
    with pytest.raises(openai.APIError, match="broke mid-stream"):
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 3


def test_stream_without_done_is_an_error_not_a_clean_end(sidecar: Sidecar) -> None:
    _, raw = stream_raw(sidecar, {"chunks": 2, "no_done": True})
    assert b"without [DONE]" in raw
    assert b"data: [DONE]" not in raw


def test_stream_stalled_past_the_idle_timeout_gets_a_timeout_frame(sidecar: Sidecar) -> None:
    started = time.monotonic()
    _, raw = stream_raw(sidecar, {"chunks": 5, "stall_after": 2})
    assert b"upstream_timeout" in raw
    assert b"[DONE]" not in raw
    assert time.monotonic() - started < 4


def test_heartbeats_while_the_upstream_is_silent(sidecar: Sidecar) -> None:
    _response, raw = stream_raw(sidecar, {"chunks": 2, "silent_s": 0.8})
    assert raw.count(b": keep-alive\n\n") >= 2
    assert raw.endswith(b"data: [DONE]\n\n")


def test_client_disconnect_cancels_the_upstream_at_once(sidecar: Sidecar,
                                                        upstream: MockUpstream) -> None:
    with httpx.stream("POST", sidecar.base_url + "/chat/completions", timeout=30,
                      json={"model": "gpt-test", "messages": USER, "stream": True,
                            "mock": {"chunks": 200, "chunk_delay": 0.05, "key": "gone"}}
                      ) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    closed = time.monotonic()
    assert upstream.aborted_event.wait(2)
    assert time.monotonic() - closed < 1
    assert upstream.aborted == ["gone"]


def test_client_disconnect_before_the_answer_cancels_the_upstream(
        sidecar: Sidecar, upstream: MockUpstream) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(sidecar.base_url + "/chat/completions", timeout=0.3,
                   json={"model": "gpt-test", "messages": USER,
                         "mock": {"delay_s": 1.2, "key": "early"}})
    assert upstream.aborted_event.wait(2)
    assert upstream.aborted == ["early"]


def test_sidecar_is_healthy_after_every_fault(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "Hello from mock: hi"


def test_json_with_surrounding_whitespace_is_still_json(sidecar: Sidecar,
                                                        upstream: MockUpstream) -> None:
    response = post(sidecar, {"pad": True})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hello from mock: hi"
