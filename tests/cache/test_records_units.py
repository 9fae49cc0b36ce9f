"""Records without I/O: what is a stream worth keeping, and the conversions between a kept
stream and a JSON answer (a bad record is a miss, never an exception)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sidecar.cache.records import Record, as_chunks, as_json, servable, whole_stream


def chunk(content: str | None = None, finish: str | None = None, *, index: int = 0,
          role: bool = False, **extra: Any) -> bytes:
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if content is not None:
        delta["content"] = content
    return orjson.dumps({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 5,
                         "model": "m", "system_fingerprint": "fp", **extra,
                         "choices": [{"index": index, "delta": delta, "logprobs": None,
                                      "finish_reason": finish}]})


def text_chunk(text: str, finish: str | None = None) -> bytes:
    return orjson.dumps({"id": "cmpl-up", "object": "text_completion", "created": 5,
                         "model": "m", "choices": [{"index": 0, "text": text, "logprobs": None,
                                                    "finish_reason": finish}]})


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
USAGE_CHUNK = orjson.dumps({"id": "chatcmpl-up", "object": "chat.completion.chunk",
                            "created": 5, "model": "m", "choices": [], "usage": USAGE})
WHOLE = [chunk("", role=True), chunk("Hel"), chunk("lo"), chunk(finish="stop")]


def stream(*chunks: bytes) -> Record:
    return Record("t", "stream", chunks=list(chunks))


def loads(items: list[bytes] | None) -> list[dict[str, Any]]:
    assert items is not None
    return [orjson.loads(i) for i in items]


# -- whole_stream -------------------------------------------------------------------------

def test_a_stream_with_a_finish_reason_is_whole() -> None:
    assert whole_stream(WHOLE)
    assert whole_stream([*WHOLE, USAGE_CHUNK])
    assert whole_stream([text_chunk("a"), text_chunk("", "length")])


@pytest.mark.parametrize("chunks", [
    [],
    [chunk("a")],
    [chunk("a"), chunk(finish="")],
    [USAGE_CHUNK],
    [chunk("a"), b'{"error": {"message": "boom"}}', chunk(finish="stop")],
    [chunk("a", finish="stop", error={"message": "late"})],
    [chunk("a"), b"not json", chunk(finish="stop")],
    [chunk("a"), b"[1]", chunk(finish="stop")],
    [chunk("a"), b'"text"', chunk(finish="stop")],
    [b'{"choices": {"index": 0}}', chunk(finish="stop")],
    [b'{"choices": ["x"]}', chunk(finish="stop")],
    # Two choices, only one of them finished.
    [chunk("a", index=0), chunk("b", index=1), chunk(finish="stop", index=0)],
    # An index no choice can have (it raised TypeError: unhashable).
    [b'{"choices": [{"index": [0], "finish_reason": "stop"}]}'],
    [b'{"choices": [{"index": {"a": 1}, "finish_reason": "stop"}]}'],
], ids=["empty", "no_finish", "empty_finish", "usage_only", "error_event", "error_field",
        "not_json", "array", "string", "choices_object", "choice_not_object", "one_of_two",
        "index_list", "index_object"])
def test_a_stream_that_did_not_end_well_is_not_whole(chunks: list[bytes]) -> None:
    assert not whole_stream(chunks)
    assert as_json(stream(*chunks)) is None
    assert as_chunks(stream(*chunks), False) is None
    assert as_chunks(stream(*chunks), True) is None


def test_every_choice_of_a_stream_must_finish() -> None:
    assert whole_stream([chunk("a", index=0), chunk("b", index=1),
                         chunk(finish="stop", index=1), chunk(finish="stop", index=0)])
    assert whole_stream([b'{"choices": [{"finish_reason": "stop"}]}'])
    assert whole_stream([chunk("a"), b'{"id": "x"}', chunk(finish="stop")])


def test_a_choice_without_an_index_is_choice_0_and_each_choice_finishes_for_itself() -> None:
    unnamed_finish = b'{"choices": [{"delta": {}, "finish_reason": "stop"}]}'
    assert whole_stream([chunk("a", index=0), unnamed_finish])
    assert not whole_stream([chunk("a", index=1), unnamed_finish])
    assert not whole_stream([chunk("a", index=0), chunk(finish="stop", index=0),
                             chunk("b", index=1)])


def event(kind: str, **fields: Any) -> bytes:
    return orjson.dumps({"type": kind, **fields})


MESSAGE = [event("message_start", message={"id": "msg_1", "usage": {"input_tokens": 3}}),
           event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
           event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi"}),
           event("content_block_stop", index=0),
           event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 1}),
           event("message_stop")]


def test_an_anthropic_stream_is_whole_with_a_stop_reason_and_no_error() -> None:
    assert whole_stream(MESSAGE)
    assert servable(Record("t", "stream", chunks=MESSAGE))


@pytest.mark.parametrize("chunks", [
    [*MESSAGE[:4], event("message_delta", delta={"stop_reason": None}), MESSAGE[-1]],
    [*MESSAGE[:4], event("message_delta", delta="end_turn"), MESSAGE[-1]],
    [*MESSAGE[:4], event("error", error={"type": "overloaded_error"})],
    [*MESSAGE[:3], event("error", error={"type": "overloaded_error"}), *MESSAGE[3:]],
], ids=["no_stop_reason", "delta_not_object", "error_instead", "error_then_stop"])
def test_an_anthropic_stream_that_did_not_end_well_is_not_whole(chunks: list[bytes]) -> None:
    assert not whole_stream(chunks)


def test_a_json_record_is_servable_only_when_it_is_an_object() -> None:
    assert servable(Record("t", "json", b'{"choices": []}'))
    for body in (b"", b"nope", b"[1]", b"null"):
        assert not servable(Record("t", "json", body))
        assert as_json(Record("t", "json", body)) is None
        assert as_chunks(Record("t", "json", body), False) is None
    assert not servable(Record("t", "other", b"{}"))
    assert not servable(Record("t", "other", chunks=WHOLE))


# -- encode / decode ----------------------------------------------------------------------

def test_a_record_survives_encoding() -> None:
    record = Record("alice", "stream", b"body", [b"one", b"two"])
    again = Record.decode(record.encode())
    assert again == record


@pytest.mark.parametrize("raw", [None, b"", b"nope", b"[]", b'{"t": "a"}',
                                 b'{"t": "a", "k": "json", "b": "", "c": 5}'])
def test_what_is_not_a_record_decodes_to_none(raw: bytes | None) -> None:
    assert Record.decode(raw) is None


# -- as_json ------------------------------------------------------------------------------

def test_a_json_record_is_returned_as_it_was_kept() -> None:
    body = b'{"object": "chat.completion", "choices": []}'
    assert as_json(Record("t", "json", body)) == body


def test_a_chat_stream_becomes_one_chat_completion() -> None:
    whole = orjson.loads(as_json(stream(*WHOLE, USAGE_CHUNK)) or b"")
    assert whole == {
        "id": "chatcmpl-up", "object": "chat.completion", "created": 5, "model": "m",
        "system_fingerprint": "fp", "usage": USAGE,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello",
                                             "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}]}


def test_a_completion_stream_becomes_one_text_completion() -> None:
    whole = orjson.loads(as_json(stream(text_chunk("a"), text_chunk("b", "length"))) or b"")
    assert whole == {"id": "cmpl-up", "object": "text_completion", "created": 5, "model": "m",
                     "choices": [{"index": 0, "text": "ab", "logprobs": None,
                                  "finish_reason": "length"}]}


def test_the_finish_reason_is_the_last_one_given() -> None:
    whole = orjson.loads(as_json(stream(chunk("a", "length"), chunk(finish=None),
                                        chunk(finish="stop"))) or b"")
    assert whole["choices"][0]["finish_reason"] == "stop"
    kept = orjson.loads(as_json(stream(chunk("a", "stop"), chunk("b"))) or b"")
    assert kept["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("chunks", [
    [chunk("a", index=1, finish="stop")],
    [chunk("a"), orjson.dumps({"object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"tool_calls": [{"index": 0}]}, "finish_reason": "tool_calls"}]})],
    [chunk("a"), orjson.dumps({"object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"function_call": {"name": "f"}}, "finish_reason": "stop"}]})],
    [chunk("a"), orjson.dumps({"object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": "text", "finish_reason": "stop"}]})],
    [chunk("a"), orjson.dumps({"object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": 5}, "finish_reason": "stop"}]})],
    [orjson.dumps({"object": "text_completion", "choices": [
        {"index": 0, "text": ["x"], "finish_reason": "stop"}]})],
], ids=["second_choice", "tool_calls", "function_call", "delta_not_object", "content_number",
        "text_list"])
def test_a_stream_that_is_not_one_text_choice_has_no_json_form(chunks: list[bytes]) -> None:
    assert as_json(stream(*chunks)) is None


def test_a_stream_without_fingerprint_or_usage_leaves_them_out() -> None:
    plain = orjson.dumps({"object": "chat.completion.chunk", "id": "i", "choices": [
        {"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]})
    whole = orjson.loads(as_json(stream(plain)) or b"")
    assert "system_fingerprint" not in whole and "usage" not in whole
    assert whole["choices"][0]["message"]["content"] == "x"
    assert whole["created"] is None and whole["model"] is None


# -- as_chunks ----------------------------------------------------------------------------

def test_a_stream_is_replayed_with_a_fresh_id_and_created() -> None:
    replayed = loads(as_chunks(stream(*WHOLE), False))
    assert len(replayed) == len(WHOLE)
    ids = {c["id"] for c in replayed}
    assert len(ids) == 1
    [fresh] = ids
    assert fresh.startswith("chatcmpl-") and fresh != "chatcmpl-up" and len(fresh) == 33
    assert all(c["created"] > 1_000_000_000 for c in replayed)
    assert [c["choices"] for c in replayed] == [orjson.loads(c)["choices"] for c in WHOLE]
    assert all("usage" not in c for c in replayed)
    again = loads(as_chunks(stream(*WHOLE), False))
    assert again[0]["id"] != fresh


def test_a_completion_stream_is_replayed_with_a_cmpl_id() -> None:
    replayed = loads(as_chunks(stream(text_chunk("a", "stop")), False))
    assert replayed[0]["id"].startswith("cmpl-") and len(replayed[0]["id"]) == 29


def test_usage_is_replayed_only_when_asked_and_only_when_recorded() -> None:
    assert as_chunks(stream(*WHOLE), True) is None  # recorded without it: a miss
    with_usage = loads(as_chunks(stream(*WHOLE, USAGE_CHUNK), True))
    assert with_usage[-1]["usage"] == USAGE and with_usage[-1]["choices"] == []
    assert all(c["usage"] is None for c in with_usage[:-1])
    assert len({c["id"] for c in with_usage}) == 1
    without = loads(as_chunks(stream(*WHOLE, USAGE_CHUNK), False))
    assert len(without) == len(WHOLE) and all("usage" not in c for c in without)
    inline = chunk(finish="stop", usage=USAGE)
    kept = loads(as_chunks(stream(chunk("a"), inline), False))
    assert len(kept) == 2 and "usage" not in kept[-1]
    assert kept[-1]["choices"][0]["finish_reason"] == "stop"
    kept = loads(as_chunks(stream(chunk("a"), inline), True))
    assert kept[-1]["usage"] == USAGE and kept[-1]["choices"]


def chat_answer(**fields: Any) -> Record:
    message = fields.pop("message", {"role": "assistant", "content": "Hi"})
    body = {"id": "chatcmpl-up", "object": "chat.completion", "created": 5, "model": "m",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "stop"}], "usage": USAGE, **fields}
    return Record("t", "json", orjson.dumps(body))


def test_a_chat_answer_is_replayed_as_a_stream() -> None:
    replayed = loads(as_chunks(chat_answer(system_fingerprint="fp"), False))
    assert [c["choices"][0]["delta"] for c in replayed] == [
        {"role": "assistant", "content": ""}, {"content": "Hi"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in replayed] == [None, None, "stop"]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m"
               and c["system_fingerprint"] == "fp" and "usage" not in c
               and c["choices"][0]["index"] == 0 and c["choices"][0]["logprobs"] is None
               for c in replayed)
    assert replayed[0]["id"].startswith("chatcmpl-") and replayed[0]["id"] != "chatcmpl-up"
    assert replayed[0]["created"] > 5
    with_usage = loads(as_chunks(chat_answer(), True))
    assert len(with_usage) == 4 and "system_fingerprint" not in with_usage[0]
    assert with_usage[-1]["usage"] == USAGE and with_usage[-1]["choices"] == []
    assert all(c["usage"] is None for c in with_usage[:-1])
    assert len({c["id"] for c in with_usage}) == 1


def test_a_chat_answer_with_no_content_replays_empty_text() -> None:
    replayed = loads(as_chunks(chat_answer(message={"role": "assistant", "content": None}),
                               False))
    assert replayed[1]["choices"][0]["delta"] == {"content": ""}
    assert loads(as_chunks(chat_answer(message=None), False))[1]["choices"][0]["delta"] == {
        "content": ""}


def test_a_text_answer_is_replayed_as_a_stream() -> None:
    body = orjson.dumps({"id": "cmpl-up", "object": "text_completion", "model": "m",
                         "choices": [{"index": 0, "text": "ab", "finish_reason": "length"}]})
    replayed = loads(as_chunks(Record("t", "json", body), False))
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in replayed] == [
        ("ab", None), ("", "length")]
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-")
               and c["choices"][0]["logprobs"] is None for c in replayed)
    assert as_chunks(Record("t", "json", body), True) is None  # no usage to give
    empty = orjson.dumps({"object": "text_completion", "choices": [{"index": 0}]})
    assert loads(as_chunks(Record("t", "json", empty), False))[0]["choices"][0]["text"] == ""


@pytest.mark.parametrize("body", [
    {"choices": []},
    {"choices": [{"message": {}}, {"message": {}}]},
    {"choices": "x"},
    {"choices": ["x"]},
    {"choices": [{"message": "x"}]},
    {"choices": [{"message": {"tool_calls": [{"id": "c"}]}}]},
    {"choices": [{"message": {"function_call": {"name": "f"}}}]},
], ids=["none", "two", "not_list", "not_object", "message_not_object", "tool_calls",
        "function_call"])
def test_an_answer_that_is_not_one_text_choice_is_not_replayed(body: dict[str, Any]) -> None:
    assert as_chunks(Record("t", "json", orjson.dumps(body)), False) is None


def test_a_choice_without_an_index_is_the_first() -> None:
    plain = orjson.dumps({"object": "chat.completion.chunk", "choices": [
        {"delta": {"content": "x"}, "finish_reason": "stop"}]})
    whole = orjson.loads(as_json(stream(plain)) or b"")
    assert whole["choices"][0]["message"]["content"] == "x"


def test_an_empty_or_missing_text_adds_nothing() -> None:
    bare = orjson.dumps({"object": "text_completion", "choices": [
        {"index": 0, "finish_reason": "stop"}]})
    whole = orjson.loads(as_json(stream(text_chunk(""), bare)) or b"")
    assert whole["choices"][0]["text"] == ""


def test_replayed_usage_and_other_chunks_keep_their_shape() -> None:
    note = orjson.dumps({"id": "x", "object": "chat.completion.chunk", "created": 1})
    replayed = loads(as_chunks(stream(chunk("a"), note, chunk(finish="stop"), USAGE_CHUNK),
                               True))
    assert len(replayed) == 4 and "choices" not in replayed[1]
    assert replayed[1]["usage"] is None  # a chunk of its own, not usage
    assert len(loads(as_chunks(stream(chunk("a"), note, chunk(finish="stop")), False))) == 3
    # Usage recorded before the last chunk: what follows it is replayed all the same.
    early = loads(as_chunks(stream(chunk("a"), USAGE_CHUNK, chunk(finish="stop")), True))
    assert [bool(c["choices"]) for c in early] == [True, False, True]
    assert replayed[-1]["created"] == replayed[0]["created"] > 5
    body = orjson.dumps({"object": "text_completion", "choices": [
        {"index": 0, "text": "ab", "finish_reason": "stop"}]})
    assert all(c["choices"][0]["index"] == 0
               for c in loads(as_chunks(Record("t", "json", body), False)))
