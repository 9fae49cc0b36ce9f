"""The embedded CPU model behind the Responses API and the chat WebSocket, with the sidecar as a
real process: `client.responses.create` translated for the local engine, a socket turn that
carries the same text and usage as the SSE stream for the same seeded request, and a cancel
message that frees the engine's slot within a few tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.backends.test_local import (
    LONG_ANSWER,
    QUESTION,
    engine_state,
    local_config,
    wait_idle,
    wait_ready,
)
from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.upstream_mock import MockUpstream

SEEDED: dict[str, Any] = {"model": "local", "messages": QUESTION, "temperature": 0.8,
                          "seed": 7, "max_tokens": 24}


@pytest.fixture(scope="module")
def local(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Sidecar]:
    instance = start_sidecar(local_config(mock_upstream), tmp_path_factory.mktemp("local-ws"))
    wait_ready(instance)
    yield instance
    instance.stop()


def test_the_local_engine_answers_a_response_whole_and_streamed(local: Sidecar) -> None:
    client = local.client()
    response = client.responses.create(model="local", input="What is the capital of France?",
                                       temperature=0, max_output_tokens=40)
    assert "Paris" in response.output_text
    assert response.status == "completed"
    assert response.usage is not None and response.usage.output_tokens > 0
    short = client.responses.create(model="local", input="Write a long story.",
                                    max_output_tokens=16)
    assert short.status == "incomplete"
    assert short.incomplete_details is not None
    assert short.incomplete_details.reason == "max_output_tokens"
    events = list(client.responses.create(model="local", input="What is the capital of "
                                          "France?", temperature=0, max_output_tokens=40,
                                          stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == response.output_text  # type: ignore[union-attr]


async def test_a_socket_turn_says_what_the_sse_stream_says(local: Sidecar) -> None:
    client = local.async_client()
    stream = await client.chat.completions.create(
        **SEEDED, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    await client.close()
    sse_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    sse_usage = chunks[-1].usage
    assert sse_usage is not None
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(local.url + "/v1/chat/completions/ws") as socket:
        await socket.send_json(SEEDED)
        messages = []
        while not messages or messages[-1].get("type") not in ("done", "error"):
            messages.append(await asyncio.wait_for(socket.receive_json(), 60))
    text = "".join(m["choices"][0]["delta"].get("content") or ""
                   for m in messages[:-1] if m.get("choices"))
    assert text and text == sse_text
    assert messages[-1]["usage"]["completion_tokens"] == sse_usage.completion_tokens
    assert messages[-1]["usage"]["prompt_tokens"] == sse_usage.prompt_tokens


async def test_cancel_frees_the_engines_slot_within_a_few_tokens(local: Sidecar) -> None:
    await asyncio.to_thread(wait_idle, local)
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(local.url + "/v1/chat/completions/ws") as socket:
        await socket.send_json({"model": "local", "messages": LONG_ANSWER, "max_tokens": 400})
        for _ in range(4):
            await asyncio.wait_for(socket.receive_json(), 60)
        assert (await asyncio.to_thread(engine_state, local))["active_jobs"] == 1
        before = (await asyncio.to_thread(engine_state, local))["tokens_generated"]
        started = time.monotonic()
        await socket.send_json({"type": "cancel"})
        while (await asyncio.wait_for(socket.receive_json(), 10)).get("type") != "cancelled":
            pass
        state = await asyncio.to_thread(wait_idle, local, 2)
    assert state["active_jobs"] == 0
    assert time.monotonic() - started < 2
    # Stopped at once: a few tokens after the cancel, not the 400 it asked for.
    assert state["tokens_generated"] - before < 20
