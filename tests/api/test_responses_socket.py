"""The Responses API over a WebSocket (`GET /v1/responses` upgraded), with aiohttp's WebSocket
client against the app on loopback: the SSE stream's events for `response.create`, one
response in flight, `response.cancel` aborting the upstream request, the pass-through target,
and the token on the upgrade while `POST /v1/responses` keeps the edge's guard."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.support.auth_helpers import jwt_config, make_issuer
from tests.support.responses_mock import ResponsesUpstream
from tests.support.upstream_mock import MockUpstream
from tests.support.websockets import make_app, opened

PATH = "/v1/responses"


@pytest.fixture(scope="module")
def responses_upstream() -> Iterator[ResponsesUpstream]:
    server = ResponsesUpstream()
    server.start()
    yield server
    server.stop()


def with_responses(upstream: ResponsesUpstream) -> str:
    return f"""
[providers.resp]
kind = "openai"
base_url = "{upstream.base_url}"
responses = true

[models."resp"]
targets = [ {{ provider = "resp", model = "resp-upstream" }} ]
"""


async def until_end(socket: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        event: dict[str, Any] = await asyncio.wait_for(socket.receive_json(), 5)
        events.append(event)
        if event["type"] in ("response.completed", "response.incomplete", "response.failed",
                             "error", "response.cancelled"):
            return events


async def test_a_socket_turn_carries_the_same_events_as_the_sse_stream(
        upstream: MockUpstream, responses_upstream: ResponsesUpstream, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(upstream, tmp_path, monkeypatch, extra=with_responses(responses_upstream))
    async with opened(app) as (url, session):
        async with session.ws_connect(url + PATH) as socket:
            await socket.send_json({"type": "response.create", "model": "gpt-test",
                                    "input": "over the socket"})
            events = await until_end(socket)
            await socket.send_json({"type": "response.create", "model": "resp",
                                    "input": "passed through"})
            passed = await until_end(socket)
        sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        stream = await sdk.responses.create(model="gpt-test", input="over the socket",
                                            stream=True)
        sse = [event.model_dump(exclude_none=True) async for event in stream]
        await sdk.close()
    assert [e["type"] for e in events] == [e["type"] for e in sse]
    assert events[-1]["type"] == "response.completed"
    socket_done, sse_done = events[-1]["response"], sse[-1]["response"]
    assert socket_done["output"][0]["content"][0]["text"] == \
        sse_done["output"][0]["content"][0]["text"] == "Hello from mock: over the socket"
    assert socket_done["usage"] == sse_done["usage"]
    assert socket_done["usage"]["output_tokens"] > 0
    assert [e["type"] for e in passed] == ["response.created", "response.output_text.delta",
                                           "response.completed"]
    assert passed[1]["delta"] == "upstream says: passed through"


async def test_response_cancel_stops_the_response_and_its_upstream_request(
        upstream: MockUpstream, responses_upstream: ResponsesUpstream, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    responses_upstream.aborted.clear()
    app = make_app(upstream, tmp_path, monkeypatch, extra=with_responses(responses_upstream))
    async with opened(app) as (url, session), session.ws_connect(url + PATH) as socket:
        await socket.send_json({"type": "response.create", "model": "resp",
                                "input": "slow answer"})
        first = await asyncio.wait_for(socket.receive_json(), 5)
        assert first["type"] == "response.created"
        await socket.send_json({"type": "response.create", "model": "gpt-test",
                                "input": "meanwhile"})
        refused = await asyncio.wait_for(socket.receive_json(), 5)
        assert refused["error"]["code"] == "response_already_in_flight"
        await socket.send_json({"type": "response.cancel"})
        rest = await until_end(socket)
        assert rest[-1] == {"type": "response.cancelled"}
        assert await asyncio.to_thread(responses_upstream.aborted.wait, 5)
        # The socket takes the next response.
        await socket.send_json({"type": "response.create", "model": "gpt-test",
                                "input": "after"})
        assert (await until_end(socket))[-1]["type"] == "response.completed"


async def test_the_socket_needs_the_token_and_the_post_keeps_the_edges_guard(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    issuer = make_issuer(tmp_path)
    app = make_app(upstream, tmp_path, monkeypatch,
                   extra=jwt_config(f'public_key_file = "{issuer.public_path}"'))
    async with opened(app) as (url, session):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url + PATH)
        assert refused.value.status == 401
        posted = await session.post(url + PATH, json={"model": "gpt-test", "input": "x"})
        assert posted.status == 401
        good = {"Authorization": f"Bearer {issuer.token()}"}
        async with session.ws_connect(url + PATH, headers=good) as socket:
            await socket.send_json({"type": "response.create", "model": "gpt-test",
                                    "input": "signed"})
            assert (await until_end(socket))[-1]["type"] == "response.completed"


async def test_the_openai_sdks_own_websocket_mode_gets_a_response(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(upstream, tmp_path, monkeypatch)
    async with opened(app) as (url, _):
        sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        async with sdk.responses.connect(max_retries=0) as connection:
            await connection.response.create(model="gpt-test", input="through the sdk")
            kinds = []
            async for event in connection:
                kinds.append(event.type)
                if event.type == "response.completed":
                    assert event.response.output_text == "Hello from mock: through the sdk"
                    break
        await sdk.close()
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
