"""The local engine behind the Anthropic front door: the official `anthropic` client, through
the sidecar as a real process, to the embedded model generating on the CPU; its OpenAI-form
answer translated into a Messages answer and Messages stream events."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.backends.test_local import local_config, wait_ready
from tests.support.messages_door import said, sse_events
from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.upstream_mock import MockUpstream

QUESTION = said("What is the capital of France?")


@pytest.fixture(scope="module")
def engine(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Sidecar]:
    instance = start_sidecar(local_config(mock_upstream), tmp_path_factory.mktemp("local"))
    wait_ready(instance)
    yield instance
    instance.stop()


def test_a_message_from_the_local_engine(engine: Sidecar) -> None:
    claude = anthropic.Anthropic(base_url=engine.url, api_key="unused", max_retries=0)
    message = claude.messages.create(model="local", max_tokens=4, messages=QUESTION,
                                     extra_body={"temperature": 0}, timeout=60)
    assert message.content[0].type == "text"
    assert message.content[0].text.strip()
    assert message.stop_reason == "max_tokens"  # four tokens say less than the answer
    assert message.usage.output_tokens == 4
    assert message.usage.input_tokens > 5


def test_a_stream_from_the_local_engine_is_anthropics_event_sequence(engine: Sidecar) -> None:
    reply = httpx.post(engine.url + "/v1/messages", timeout=60, json={
        "model": "local", "max_tokens": 6, "temperature": 0, "stream": True,
        "messages": QUESTION})
    events = sse_events(reply.text)
    # Pings keep the connection alive while the model works, always after message_start.
    assert events[0][0] == "message_start"
    names = [name for name, _ in events if name != "ping"]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["usage"]["output_tokens"] == 6
    claude = anthropic.Anthropic(base_url=engine.url, api_key="unused", max_retries=0)
    with claude.messages.stream(model="local", max_tokens=6, messages=QUESTION,
                                extra_body={"temperature": 0}, timeout=60) as stream:
        text = stream.get_final_text()
    # The same greedy answer, whichever way it was asked for.
    assert text == "".join(data["delta"]["text"] for name, data in events
                           if name == "content_block_delta")
