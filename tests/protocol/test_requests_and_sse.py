"""Pure protocol code: SSE splitting, request validation, the forbidden-field guard."""

from __future__ import annotations

import time

import pytest

from sidecar.errors import ForbiddenField, InvalidRequest
from sidecar.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    decode_body,
    validate,
)
from sidecar.protocol.sse import EventSplitter, EventTooLarge


def chat(**fields: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


class TestEventSplitter:
    def test_one_event_per_chunk(self) -> None:
        splitter = EventSplitter()
        assert splitter.feed(b'data: {"a":1}\n\n') == [b'{"a":1}']

    def test_event_split_across_chunks_is_returned_when_complete(self) -> None:
        splitter = EventSplitter()
        assert splitter.feed(b'data: {"a"') == []
        assert splitter.pending
        assert splitter.feed(b':1}\n') == []
        assert splitter.feed(b'\n') == [b'{"a":1}']
        assert not splitter.pending

    def test_several_events_in_one_chunk(self) -> None:
        splitter = EventSplitter()
        assert splitter.feed(b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n") == [b"1", b"2", b"[DONE]"]

    def test_crlf_line_endings_even_when_split_between_cr_and_lf(self) -> None:
        splitter = EventSplitter()
        # The CR already ends the empty line; the LF after it belongs to it, and starts none.
        assert splitter.feed(b"data: 1\r\n\r") == [b"1"]
        assert splitter.feed(b"\ndata: 2\r\n\r\n") == [b"2"]
        assert splitter.feed(b"data: 3\r") == []
        assert splitter.feed(b"\n") == []
        assert splitter.feed(b"\r\n") == [b"3"]

    def test_comments_and_other_fields_are_dropped(self) -> None:
        splitter = EventSplitter()
        assert splitter.feed(b": ping\n\nevent: x\nid: 3\ndata: 1\n\n") == [b"1"]

    def test_multiline_data_is_joined_with_newline(self) -> None:
        assert EventSplitter().feed(b"data: a\ndata:b\n\n") == [b"a\nb"]

    def test_separator_split_across_chunks_in_every_spelling(self) -> None:
        for stream in (b"data: 1\n\ndata: 2\n\n", b"data: 1\r\n\r\ndata: 2\r\n\r\n",
                       b"data: 1\r\rdata: 2\r\r"):
            splitter = EventSplitter()
            events = [event for byte in stream for event in splitter.feed(bytes([byte]))]
            assert events == [b"1", b"2"], stream
            assert not splitter.pending

    def test_unfinished_event_over_the_limit_raises(self) -> None:
        splitter = EventSplitter(max_event_bytes=1024)
        assert splitter.feed(b"data: " + b"x" * 1000) == []
        with pytest.raises(EventTooLarge):
            splitter.feed(b"x" * 100)

    def test_whole_event_over_the_limit_raises_with_the_events_before_it(self) -> None:
        splitter = EventSplitter(max_event_bytes=1024)
        with pytest.raises(EventTooLarge) as caught:
            splitter.feed(b"data: 1\n\ndata: " + b"x" * 2000 + b"\n\n")
        assert caught.value.events == [b"1"]

    def test_event_at_the_limit_passes(self) -> None:
        event = b"data: " + b"x" * 1018
        assert EventSplitter(max_event_bytes=1024).feed(event[:500]) == []
        splitter = EventSplitter(max_event_bytes=1024)
        assert splitter.feed(event[:500]) == [] and splitter.feed(event[500:] + b"\n\n") == [
            b"x" * 1018]

    def test_a_long_unfinished_event_costs_time_in_proportion_to_its_bytes(self) -> None:
        # 16 MiB in 4 KiB chunks: searched once, this takes milliseconds; re-copied or
        # re-searched per chunk, it is some 32 GiB of work.
        splitter = EventSplitter(max_event_bytes=32 << 20)
        chunk = b"x" * 4096
        started = time.perf_counter()
        splitter.feed(b"data: ")
        for _ in range(4096):
            splitter.feed(chunk)
        assert splitter.feed(b"\n\n") == [b"x" * (16 << 20)]
        assert time.perf_counter() - started < 2.0


class TestValidation:
    def test_valid_chat_request_keeps_unknown_fields_in_the_body(self) -> None:
        payload = decode_body(b'{"model":"m","messages":[{"role":"user","content":"hi"}],'
                              b'"logprobs":true,"tools":[]}')
        request = validate(payload, ChatCompletionRequest)
        assert request.model == "m"
        assert payload["logprobs"] is True and payload["tools"] == []

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            (chat(messages=[]), "messages"),
            (chat(messages="hi"), "messages"),
            (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
            (chat(messages=[{"content": "x"}]), "messages[0].role"),
            (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
            (chat(max_tokens=0), "max_tokens"),
            (chat(max_tokens="10"), "max_tokens"),
            (chat(temperature=-1), "temperature"),
            (chat(top_p=2), "top_p"),
            (chat(n=True), "n"),
            (chat(stream="yes"), "stream"),
            (chat(stop=[1, 2]), "stop[0]"),
            (chat(stream_options={"include_usage": "x"}), "stream_options.include_usage"),
            ({"messages": [{"role": "user", "content": "x"}]}, "model"),
            (chat(model=""), "model"),
        ],
    )
    def test_bad_chat_fields_name_the_param(self, body: dict[str, object], param: str) -> None:
        with pytest.raises(InvalidRequest) as caught:
            validate(body, ChatCompletionRequest)
        assert caught.value.param == param
        assert param in caught.value.message
        assert caught.value.status == 400

    def test_completion_prompt_shapes(self) -> None:
        for prompt in ("text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
            assert validate({"model": "m", "prompt": prompt}, CompletionRequest).prompt == prompt
        for bad in ({"x": 1}, [], [1, "a"], [[]], [True]):
            with pytest.raises(InvalidRequest) as caught:
                validate({"model": "m", "prompt": bad}, CompletionRequest)
            assert caught.value.param == "prompt"

    def test_embedding_requires_input(self) -> None:
        with pytest.raises(InvalidRequest) as caught:
            validate({"model": "m"}, EmbeddingRequest)
        assert caught.value.param == "input"

    @pytest.mark.parametrize("body", [b"", b"{", b"[1,2]", b'"text"', b"\xff\xfe"])
    def test_malformed_bodies_are_refused(self, body: bytes) -> None:
        with pytest.raises(InvalidRequest):
            decode_body(body)


class TestForbiddenFields:
    @pytest.mark.parametrize(
        ("body", "param"),
        [
            (b'{"model":"m","api_base":"http://evil"}', "api_base"),
            (b'{"model":"m","base_url":"http://evil"}', "base_url"),
            (b'{"model":"m","api_key":"sk-x"}', "api_key"),
            (b'{"model":"m","api_version":"1"}', "api_version"),
            (b'{"model":"m","extra":{"deep":[{"api_base":"x"}]}}', "extra.deep[0].api_base"),
            # A key spelled with JSON escapes is still that key.
            (b'{"model":"m","api\\u005fbase":"http://evil"}', "api_base"),
        ],
    )
    def test_refused_at_any_depth(self, body: bytes, param: str) -> None:
        with pytest.raises(ForbiddenField) as caught:
            decode_body(body)
        assert caught.value.param == param
        assert caught.value.status == 400

    def test_the_words_inside_a_message_are_not_refused(self) -> None:
        body = b'{"model":"m","messages":[{"role":"user","content":"what is \\"api_key\\"?"}]}'
        assert decode_body(body)["model"] == "m"
