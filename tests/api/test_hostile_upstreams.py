"""A hostile upstream never breaks a client's translated stream: events of the wrong shape,
and counts no answer could hold, from an Anthropic upstream to an OpenAI or a Responses
client and from an OpenAI upstream to a Responses client, read as absent, and the client's
stream ends as its protocol ends it. (An OpenAI upstream to a Messages client:
tests/api/test_anthropic_traps.py.) An answer passed through whole is still answered when
its counts are past any answer. Through the sidecar as a real process, with the official
clients."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import orjson
import pytest

from tests.support.anthropic_mock import AnthropicMock
from tests.support.messages_door import start_door
from tests.support.scripted_upstream import ScriptedUpstream, chat_chunk
from tests.support.sidecar import Sidecar
from tests.support.upstream_mock import MockUpstream

# A count past 64 bits once summed: the prompt of an Anthropic usage adds three of them.
HUGE = 2**64 - 1
# Anthropic events of the wrong shape at every level.
BAD_EVENTS = [
    {"type": "content_block_delta", "index": "a", "delta": [5]},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 7}},
    {"type": "content_block_start", "index": None, "content_block": "text"},
    {"type": "content_block_stop", "index": True},
    {"type": "message_start", "message": [1]},
    {"type": 5}]


@pytest.fixture(scope="module")
def door(claude: AnthropicMock, scripted: ScriptedUpstream, mock_upstream: MockUpstream,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    instance = start_door(mock_upstream, claude, scripted, tmp_path_factory.mktemp("hostile"))
    yield instance
    instance.stop()


def sdk(door: Sidecar) -> openai.OpenAI:
    return openai.OpenAI(base_url=door.url + "/v1", api_key="unused", max_retries=0)


def steer_claude(text: str) -> str:
    """A user text the Anthropic mock answers with `text`, the malformed events after its
    first word and counts past 64 bits in message_start's usage."""
    return "mock:" + orjson.dumps({
        "text": text, "events": BAD_EVENTS,
        "usage": {"input_tokens": HUGE, "cache_read_input_tokens": HUGE}}).decode()


def test_a_malformed_anthropic_stream_never_breaks_the_openai_stream(door: Sidecar) -> None:
    chunks = list(sdk(door).chat.completions.create(
        model="claude", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": steer_claude("Hi there")}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hi there"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    # Only the cache-creation count (the mock's 5) is a count.
    assert usage is not None and usage.prompt_tokens == 5


def test_a_malformed_anthropic_stream_never_breaks_the_responses_stream(door: Sidecar
                                                                       ) -> None:
    events = list(sdk(door).responses.create(model="claude", stream=True,
                                             input=steer_claude("Hi there")))
    assert events[-1].type == "response.completed"
    completed = events[-1].response
    assert completed.output_text == "Hi there"
    assert completed.usage is not None and completed.usage.input_tokens == 5


def test_a_malformed_openai_chunk_never_breaks_the_responses_stream(door: Sidecar) -> None:
    # Tool calls that are not objects, a choice that is not one, counts past 64 bits.
    bad = orjson.dumps({
        "id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "s",
        "choices": [{"index": 0, "delta": {"tool_calls": [5, {"index": "a"}]}}, 7],
        "usage": {"prompt_tokens": HUGE, "completion_tokens": 3, "total_tokens": 2}}).decode()
    script = "script:" + orjson.dumps([chat_chunk("Hi"), bad, chat_chunk(finish="stop")]
                                      ).decode()
    events = list(sdk(door).responses.create(model="scripted", stream=True, input=script))
    assert events[-1].type == "response.completed"
    completed = events[-1].response
    assert completed.output_text == "Hi"
    assert completed.usage is not None
    assert (completed.usage.input_tokens, completed.usage.output_tokens) == (0, 3)


def test_an_anthropic_answer_with_counts_past_any_answer_still_reaches_its_client(
        door: Sidecar) -> None:
    # Passed through as bytes; the usage read for the budget and the log line sums them.
    said = "mock:" + orjson.dumps({"text": "Hi", "usage": {
        "input_tokens": HUGE, "cache_read_input_tokens": HUGE}}).decode()
    client = anthropic.Anthropic(base_url=door.url, api_key="unused", max_retries=0)
    message = client.messages.create(model="claude", max_tokens=8,
                                     messages=[{"role": "user", "content": said}])
    assert [block.type for block in message.content] == ["text"]
    assert message.usage.input_tokens == HUGE  # the upstream's words, passed on as they came
