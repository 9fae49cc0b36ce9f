"""The request path without a sidecar, in the test's loop, with backends that answer as a test
scripts them: the allow-list, the target that answers and the headers and record that say so,
fallback and spill-over before the first byte, long prompts, the token budget reserved and
settled, usage counted, and the cache in front of it all."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import orjson
import pytest

from sidecar.backends.base import Call
from sidecar.cache.answers import AnswerCache
from sidecar.cache.memory import MemoryCache
from sidecar.cache.redis_tier import RedisTier
from sidecar.cache.response_cache import ResponseCache
from sidecar.errors import ModelNotFound, SidecarError, Spillable, UpstreamError, UpstreamStatus
from sidecar.exchange import ANTHROPIC, OPENAI, Answer, Exchange
from sidecar.gateway import Gateway, estimate_tokens
from sidecar.observability.timing import RequestContext
from sidecar.routing.router import Router
from sidecar.routing.table import Route, RouteTable, Target
from sidecar.security.jwt import Forbidden, Principal
from sidecar.security.limits import Limiter
from sidecar.settings import CacheSettings, LimitsSettings, RoutingSettings
from tests.support.sidecar import closed_port

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
BODY = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "x",
                     "choices": [{"index": 0, "message": {"role": "assistant",
                                                          "content": "Hi"},
                                  "finish_reason": "stop"}], "usage": USAGE})
CHUNKS = [orjson.dumps({"object": "chat.completion.chunk", "choices": [
              {"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}),
          orjson.dumps({"object": "chat.completion.chunk", "choices": [
              {"index": 0, "delta": {}, "finish_reason": "stop"}]}),
          orjson.dumps({"object": "chat.completion.chunk", "choices": [], "usage": USAGE})]

UP = Target("up", "x", 1)
DOWN = Target("down", "y", 1)
LOCAL = Target("local", "z", 1, local=True)
SPARE = Target("up", "x", 0, fallback_only=True)  # only when the others failed


class Scripted:
    """A backend that answers each call with the next item of its script: bytes, or an error
    raised before anything is sent. Streams send CHUNKS."""

    protocol: str = OPENAI
    default_max_tokens: int | None = None

    def __init__(self, name: str, *script: bytes | BaseException,
                 chunks: list[bytes] | None = None, protocol: str = OPENAI) -> None:
        self.name = name
        self.script = list(script)
        self.chunks = CHUNKS if chunks is None else chunks
        self.protocol = protocol
        self.default_max_tokens = 1024 if protocol == ANTHROPIC else None
        self.calls: list[Call] = []

    def _next(self, call: Call) -> bytes:
        self.calls.append(call)
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, BaseException):
            raise item
        return item

    async def complete(self, call: Call) -> bytes:
        return self._next(call)

    async def stream(self, call: Call) -> AsyncGenerator[bytes, None]:
        self._next(call)
        for data in self.chunks:
            yield data

    async def probe(self) -> bool:
        return True

    async def close(self) -> None:
        pass


def gateway(*targets: Target, backends: list[Scripted], limits: LimitsSettings | None = None,
            cache: bool = False, count_usage: bool = False, failures_before_cooldown: int = 1,
            **route: Any) -> Gateway:
    table = RouteTable({"m": Route("m", list(targets), **route)}, [b.name for b in backends])
    answers = AnswerCache(ResponseCache(MemoryCache(8, 60), 60, secret=b"s" * 32),
                          CacheSettings(enabled=True), b"s" * 32) if cache else None
    return Gateway(table, {b.name: b for b in backends},
                   Router(RoutingSettings(failures_before_cooldown=failures_before_cooldown)),
                   Limiter(limits or LimitsSettings()), answers, count_usage=count_usage)


def exchange(model: str = "m", *, stream: bool = False, allowed: list[str] | None = None,
             body: dict[str, Any] | None = None) -> Exchange:
    payload = body if body is not None else {"model": model, "messages": [],
                                             "temperature": 0}
    principal = Principal("alice", frozenset(), frozenset(allowed) if allowed else None)
    made = Exchange("chat/completions", orjson.dumps(payload), payload, model,
                    RequestContext("req-1", principal), {})
    made.stream = stream
    made.max_output_tokens = None
    return made


async def drained(answer: Answer) -> list[bytes]:
    assert answer.events is not None
    out = [answer.first] if answer.first is not None else []
    async for data in answer.events:
        out.append(data)
    await answer.close()
    return out


# -- what may be asked ----------------------------------------------------------------------

async def test_a_model_the_token_does_not_allow_is_forbidden_before_anything_else() -> None:
    request = exchange(allowed=["other"])
    with pytest.raises(Forbidden) as caught:
        await gateway(UP, backends=[Scripted("up", BODY)]).open(request)
    assert caught.value.message == "This token may not use the model `m`."
    assert caught.value.code == "model_not_allowed" and caught.value.param == "model"
    assert request.context.record.model == "m"
    assert request.context.record.endpoint == "chat/completions"


async def test_an_unknown_model_is_not_found() -> None:
    with pytest.raises(ModelNotFound) as caught:
        await gateway(UP, backends=[Scripted("up", BODY)]).open(exchange("nope"))
    assert caught.value.message == (
        "The model `nope` does not exist or you do not have access to it.")
    assert caught.value.param == "model"


# -- the target that answers ----------------------------------------------------------------

async def test_the_target_gets_the_clients_bytes_and_its_answer_names_it() -> None:
    up = Scripted("up", BODY)
    path = gateway(UP, backends=[up])
    request = exchange(allowed=["m"])
    answer = await path.open(request)
    assert answer.body == BODY and answer.events is None
    assert answer.headers == {"X-Sidecar-Target": "up/x"}
    record = request.context.record
    assert record.target == "up/x" and record.fallback_from == [] and record.cache == ""
    assert record.first_byte_s is not None and record.first_byte_s > 0
    (call,) = up.calls
    assert orjson.loads(call.body)["model"] == "x"  # the target's own model name
    assert call.endpoint == "chat/completions" and call.request_id == "req-1"
    assert call.budget is path.router.budget and call.patient
    assert path.in_flight == {"up/x": 0}


async def test_a_stream_counts_as_in_flight_until_it_is_closed() -> None:
    up = Scripted("up", b"")
    path = gateway(UP, backends=[up])
    answer = await path.open(exchange(stream=True))
    assert up.calls[0].request_id == "req-1"
    assert answer.first == CHUNKS[0] and answer.headers["X-Sidecar-Target"] == "up/x"
    assert path.in_flight == {"up/x": 1}
    assert await drained(answer) == CHUNKS
    assert path.in_flight == {"up/x": 0}


async def test_an_error_that_is_no_answer_leaves_the_target_uncounted() -> None:
    path = gateway(UP, backends=[Scripted("up", RuntimeError("a bug"))])
    with pytest.raises(RuntimeError):
        await path.open(exchange())
    assert path.in_flight == {"up/x": 0}


# -- fallback and spill-over ----------------------------------------------------------------

async def test_a_failing_target_is_followed_by_the_next_one_within_the_retry_budget() -> None:
    down, up = Scripted("down", UpstreamError("broken")), Scripted("up", BODY)
    path = gateway(DOWN, SPARE, backends=[down, up])
    request = exchange()
    answer = await path.open(request)
    assert len(down.calls) == 1 and answer.body == BODY
    assert answer.headers == {"X-Sidecar-Target": "up/x", "X-Sidecar-Fallback-From": "down/y"}
    assert request.context.record.fallback_from == ["down/y"]
    assert request.context.record.target == "up/x"
    assert path.router.budget.spent == 1
    assert path.in_flight == {"down/y": 0, "up/x": 0}


async def test_the_last_error_is_raised_when_no_target_is_left() -> None:
    path = gateway(DOWN, backends=[Scripted("down", UpstreamError("broken"))])
    request = exchange()
    with pytest.raises(UpstreamError):
        await path.open(request)
    assert request.context.record.target == "down/y"
    assert path.router.budget.spent == 0


async def test_an_error_the_target_is_not_to_blame_for_is_no_reason_to_fall_back() -> None:
    bad = UpstreamStatus(400, "bad request", "invalid_request_error")
    up = Scripted("up", BODY)
    path = gateway(DOWN, SPARE, backends=[Scripted("down", bad), up])
    with pytest.raises(UpstreamStatus):
        await path.open(exchange())
    assert not up.calls and path.router.budget.spent == 0


async def test_without_retry_budget_the_first_failure_is_the_answer() -> None:
    up = Scripted("up", BODY)
    path = gateway(DOWN, SPARE, backends=[Scripted("down", UpstreamError("broken")), up])
    path.router.budget.balance = path.router.budget.ratio = 0.0
    with pytest.raises(UpstreamError):
        await path.open(exchange())
    assert not up.calls and path.router.budget.refused == 1


async def test_a_full_local_target_spills_over_at_no_cost_to_the_retry_budget() -> None:
    local = Scripted("local", Spillable("full"))
    up = Scripted("up", BODY)
    path = gateway(LOCAL, SPARE, backends=[local, up])
    request = exchange()
    answer = await path.open(request)
    assert answer.headers == {"X-Sidecar-Target": "up/x",
                              "X-Sidecar-Spill-Over-From": "local/z"}
    assert request.context.record.spill_over_from == ["local/z"]
    assert request.context.record.fallback_from == []
    assert path.router.budget.spent == 0
    (call,) = local.calls
    assert call.patient is False  # another target could take it


async def test_without_spill_over_a_full_local_target_is_the_answer() -> None:
    local = Scripted("local", Spillable("full"))
    path = gateway(LOCAL, SPARE, backends=[local, Scripted("up", BODY)], spill_over=False)
    with pytest.raises(Spillable):
        await path.open(exchange())
    assert local.calls[0].patient is True


async def test_a_full_local_target_alone_is_the_answer() -> None:
    local = Scripted("local", Spillable("full"))
    with pytest.raises(Spillable):
        await gateway(LOCAL, backends=[local]).open(exchange())
    assert local.calls[0].patient is True


async def test_a_long_prompt_passes_the_local_target_over() -> None:
    local, up = Scripted("local", BODY), Scripted("up", BODY)
    path = gateway(LOCAL, UP, backends=[local, up], prefer_local_below_tokens=50)
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}
    request = exchange(body=body)
    answer = await path.open(request)
    assert answer.headers["X-Sidecar-Target"] == "up/x" and not local.calls
    assert request.context.record.rule == "long_prompt"
    short = exchange()
    await path.open(short)
    assert short.context.record.rule == ""


async def test_a_long_prompt_whose_upstream_fails_does_not_fall_back_to_the_local_one() -> None:
    local, up = Scripted("local", BODY), Scripted("up", UpstreamError("broken"))
    path = gateway(LOCAL, UP, backends=[local, up], prefer_local_below_tokens=10)
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}
    request = exchange(body=body)
    with pytest.raises(UpstreamError):
        await path.open(request)
    assert not local.calls and request.context.record.fallback_from == []


async def test_a_local_target_a_long_prompt_passed_over_is_not_named_as_failed() -> None:
    local, down, up = Scripted("local", BODY), Scripted("down", UpstreamError("x")), \
        Scripted("up", BODY)
    path = gateway(LOCAL, DOWN, SPARE, backends=[local, down, up], prefer_local_below_tokens=10)
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}
    request = exchange(body=body)
    answer = await path.open(request)
    assert answer.headers["X-Sidecar-Target"] == "up/x" and not local.calls
    assert answer.headers["X-Sidecar-Fallback-From"] == "down/y"
    assert request.context.record.fallback_from == ["down/y"]


# -- usage and the token budget -------------------------------------------------------------

async def test_usage_is_noted_when_asked_for_a_json_answer_and_a_stream() -> None:
    path = gateway(UP, backends=[Scripted("up", BODY)], count_usage=True)
    request = exchange()
    await path.open(request)
    assert request.context.record.usage == (3, 2, 5, -1)
    streamed = exchange(stream=True)
    await drained(await path.open(streamed))
    assert streamed.context.record.usage == (3, 2, 5, -1)
    quiet = gateway(UP, backends=[Scripted("up", BODY)])
    unnoted = exchange()
    await quiet.open(unnoted)
    assert unnoted.context.record.usage is None


async def test_usage_in_a_streams_first_chunk_is_noted_and_an_empty_stream_has_none() -> None:
    alone = orjson.dumps({"object": "chat.completion.chunk", "usage": USAGE, "choices": [
        {"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]})
    path = gateway(UP, backends=[Scripted("up", b"", chunks=[alone])], count_usage=True)
    request = exchange(stream=True)
    assert await drained(await path.open(request)) == [alone]
    assert request.context.record.usage == (3, 2, 5, -1)
    empty = gateway(UP, backends=[Scripted("up", b"", chunks=[])], count_usage=True)
    nothing = exchange(stream=True)
    assert await drained(await empty.open(nothing)) == []
    assert nothing.context.record.usage is None


def test_the_estimate_is_a_token_per_four_bytes_plus_the_longest_answer() -> None:
    request = exchange()
    prompt = len(request.body) // 4
    request.max_output_tokens = 0
    assert estimate_tokens(request, 100) == prompt
    request.max_output_tokens = None
    request.choices = 2
    assert estimate_tokens(request, 100) == prompt + 200
    request.max_output_tokens = 7
    assert estimate_tokens(request, 100) == prompt + 14


def budgeted(*script: bytes | BaseException, per_minute: int = 10_000,
             cache: bool = False) -> Gateway:
    return gateway(UP, backends=[Scripted("up", *script)], cache=cache,
                   limits=LimitsSettings(tokens_per_minute=per_minute, default_max_tokens=100))


def level(path: Gateway) -> float:
    assert path.limiter.tokens is not None
    return path.limiter.tokens._buckets["alice"].level


async def test_a_json_answer_spends_the_tokens_its_usage_reports() -> None:
    path = budgeted(BODY)
    request = exchange()
    await path.open(request)
    assert request.context.record.usage == (3, 2, 5, -1)
    assert level(path) == pytest.approx(10_000 - 5, abs=1)


async def test_a_json_answer_without_usage_keeps_the_reservation() -> None:
    path = budgeted(b"{}")
    request = exchange()
    await path.open(request)
    assert level(path) == pytest.approx(10_000 - estimate_tokens(request, 100), abs=1)


async def test_a_stream_settles_when_it_is_closed() -> None:
    path = budgeted(b"")
    request = exchange(stream=True)
    answer = await path.open(request)
    reserved = estimate_tokens(request, 100)
    assert level(path) == pytest.approx(10_000 - reserved, abs=1)
    await drained(answer)
    assert request.context.record.usage == (3, 2, 5, -1)
    assert level(path) == pytest.approx(10_000 - 5, abs=1)


async def test_a_request_no_target_served_gives_its_reservation_back() -> None:
    path = budgeted(UpstreamError("broken"))
    with pytest.raises(UpstreamError):
        await path.open(exchange())
    assert level(path) == pytest.approx(10_000, abs=1)


async def test_a_request_over_the_budget_reaches_no_target() -> None:
    up = Scripted("up", BODY)
    path = gateway(UP, backends=[up],
                   limits=LimitsSettings(tokens_per_minute=10, default_max_tokens=100))
    with pytest.raises(SidecarError) as caught:
        await path.open(exchange())
    assert caught.value.status == 429 and not up.calls


async def test_a_cache_hit_spends_no_tokens() -> None:
    path = budgeted(BODY, cache=True)
    await path.open(exchange())
    spent = 10_000 - level(path)
    hit = exchange()
    answer = await path.open(hit)
    assert answer.from_cache and hit.context.record.cache == "hit"
    assert 10_000 - level(path) == pytest.approx(spent, abs=1)


# -- the cache in front ---------------------------------------------------------------------

async def test_the_cache_answers_what_it_kept_and_an_uncacheable_request_passes_it_by() -> None:
    up = Scripted("up", BODY)
    path = gateway(UP, backends=[up], cache=True, count_usage=True)
    await path.open(exchange())
    hit = exchange()
    answer = await path.open(hit)
    assert answer.from_cache and len(up.calls) == 1
    assert hit.context.record.usage is None  # a hit used no tokens
    passing = exchange()
    passing.cacheable = False
    await path.open(passing)
    assert len(up.calls) == 2 and passing.context.record.cache == ""


# -- more than one target, more than one failure --------------------------------------------

DOWN2 = Target("down2", "w", 1)
LOCAL2 = Target("local2", "v", 1, local=True)


async def test_every_target_that_failed_is_named_in_order() -> None:
    path = gateway(DOWN, DOWN2, SPARE, backends=[
        Scripted("down", UpstreamError("x")), Scripted("down2", UpstreamError("x")),
        Scripted("up", BODY)])
    request = exchange()
    answer = await path.open(request)
    failed = request.context.record.fallback_from
    assert sorted(failed) == ["down/y", "down2/w"]
    assert answer.headers["X-Sidecar-Fallback-From"] == ", ".join(failed)
    first_byte = request.context.record.first_byte_s
    assert first_byte is not None and 0 < first_byte < 5


async def test_every_full_local_target_is_named_in_order() -> None:
    path = gateway(LOCAL, LOCAL2, SPARE, backends=[
        Scripted("local", Spillable("full")), Scripted("local2", Spillable("full")),
        Scripted("up", BODY)])
    request = exchange()
    answer = await path.open(request)
    spilled = request.context.record.spill_over_from
    assert sorted(spilled) == ["local/z", "local2/v"]
    assert answer.headers["X-Sidecar-Spill-Over-From"] == ", ".join(spilled)


async def test_a_target_that_failed_is_not_tried_again_while_it_may_still_serve() -> None:
    down, down2 = Scripted("down", UpstreamError("x")), Scripted("down2", UpstreamError("x"))
    path = gateway(DOWN, DOWN2, backends=[down, down2], failures_before_cooldown=5)
    request = exchange()
    with pytest.raises(UpstreamError):
        await path.open(request)
    assert len(down.calls) == len(down2.calls) == 1
    assert len(request.context.record.fallback_from) == 1  # the one before the last


async def test_a_local_target_tried_last_waits_for_its_model() -> None:
    local = Scripted("local", BODY)
    path = gateway(DOWN, Target("local", "z", 0, fallback_only=True, local=True),
                   backends=[Scripted("down", UpstreamError("x")), local],
                   failures_before_cooldown=5)
    await path.open(exchange())
    assert local.calls[0].patient is True  # nothing else is left: it may wait


async def test_what_failed_before_a_spill_or_a_skip_is_told_apart_when_all_fail() -> None:
    path = gateway(LOCAL, Target("up", "x", 0, fallback_only=True), backends=[
        Scripted("local", Spillable("full")), Scripted("up", UpstreamError("x"))])
    request = exchange()
    with pytest.raises(UpstreamError):
        await path.open(request)
    assert request.context.record.fallback_from == []  # the local one was full, not failed
    long = gateway(LOCAL, DOWN, SPARE, prefer_local_below_tokens=10, backends=[
        Scripted("local", BODY), Scripted("down", UpstreamError("x")),
        Scripted("up", UpstreamError("x"))])
    request = exchange(body={"model": "m", "messages": [{"role": "user", "content": "x" * 400}]})
    with pytest.raises(UpstreamError):
        await long.open(request)
    assert request.context.record.fallback_from == ["down/y"]


async def test_requests_in_flight_to_one_target_are_counted_together() -> None:
    path = gateway(UP, backends=[Scripted("up", b"")])
    answers = [await path.open(exchange(stream=True)) for _ in range(2)]
    assert path.in_flight == {"up/x": 2}
    for answer in answers:
        await answer.close()
    assert path.in_flight == {"up/x": 0}


async def test_the_call_carries_the_requests_timing() -> None:
    up = Scripted("up", BODY)
    request = exchange()
    await gateway(UP, backends=[up]).open(request)
    assert up.calls[0].timing is request.context.timing


async def test_a_prompt_estimated_at_the_limit_is_long() -> None:
    local, up = Scripted("local", BODY), Scripted("up", BODY)
    path = gateway(LOCAL, UP, backends=[local, up], prefer_local_below_tokens=50)
    payload = {"model": "m", "messages": [], "pad": ""}
    payload["pad"] = "x" * (200 - len(orjson.dumps(payload)))
    request = exchange(body=payload)
    assert len(request.body) == 200  # 50 tokens at four bytes each
    await path.open(request)
    assert request.context.record.rule == "long_prompt" and not local.calls


# -- another protocol -----------------------------------------------------------------------

MESSAGE = orjson.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": "y",
                        "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
                        "stop_sequence": None, "usage": {"input_tokens": 3,
                                                         "output_tokens": 1}})
EVENTS = [orjson.dumps({"type": "message_start", "message": {
              "id": "msg_1", "type": "message", "role": "assistant", "model": "y",
              "content": [], "usage": {"input_tokens": 3, "output_tokens": 0}}}),
          orjson.dumps({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}),
          orjson.dumps({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": "Hi"}}),
          orjson.dumps({"type": "content_block_stop", "index": 0}),
          orjson.dumps({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                        "usage": {"output_tokens": 1}})]
ANTH = Target("anth", "y", 1)


def messages_request(stream: bool = False) -> Exchange:
    payload = {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
               "max_tokens": 5}
    made = Exchange("messages", orjson.dumps(payload), payload, "m",
                    RequestContext("req-2", Principal("alice", frozenset(), None)), {},
                    ANTHROPIC)
    made.stream = stream
    made.max_output_tokens = 5
    return made


async def test_an_openai_request_to_an_anthropic_target_is_translated_both_ways() -> None:
    anth = Scripted("anth", MESSAGE, protocol=ANTHROPIC)
    answer = await gateway(ANTH, backends=[anth]).open(exchange())
    assert answer.protocol == OPENAI
    assert orjson.loads(answer.body)["choices"][0]["message"]["content"] == "Hi"
    sent = orjson.loads(anth.calls[0].body)
    assert sent["model"] == "y" and sent["max_tokens"] == 1024


async def test_a_messages_answer_keeps_its_protocol_and_its_usage_is_counted() -> None:
    path = gateway(ANTH, backends=[Scripted("anth", MESSAGE, protocol=ANTHROPIC)],
                   count_usage=True)
    request = messages_request()
    answer = await path.open(request)
    assert answer.protocol == ANTHROPIC and answer.body == MESSAGE
    assert request.context.record.usage == (3, 1, 4, -1)
    streamed = messages_request(stream=True)
    path = gateway(ANTH, backends=[Scripted("anth", b"", chunks=EVENTS, protocol=ANTHROPIC)],
                   count_usage=True)
    assert await drained(await path.open(streamed)) == EVENTS
    assert streamed.context.record.usage == (3, 1, 4, -1)


async def test_a_messages_answer_settles_the_budget_on_its_usage() -> None:
    path = gateway(ANTH, backends=[Scripted("anth", MESSAGE, protocol=ANTHROPIC)],
                   limits=LimitsSettings(tokens_per_minute=10_000, default_max_tokens=100))
    request = messages_request()
    await path.open(request)
    assert request.context.record.usage == (3, 1, 4, -1)
    assert level(path) == pytest.approx(10_000 - 4, abs=1)


async def test_a_messages_stream_settles_on_the_prompt_and_the_answer_tokens() -> None:
    path = gateway(ANTH, backends=[Scripted("anth", b"", chunks=EVENTS, protocol=ANTHROPIC)],
                   limits=LimitsSettings(tokens_per_minute=10_000, default_max_tokens=100))
    request = messages_request(stream=True)
    await drained(await path.open(request))
    assert request.context.record.usage == (3, 1, 4, -1)  # message_start's 3 included
    assert level(path) == pytest.approx(10_000 - 4, abs=1)


async def test_a_stream_without_usage_keeps_the_reservation() -> None:
    path = gateway(UP, backends=[Scripted("up", b"", chunks=CHUNKS[:2])],
                   limits=LimitsSettings(tokens_per_minute=10_000, default_max_tokens=100))
    request = exchange(stream=True)
    await drained(await path.open(request))
    assert level(path) == pytest.approx(10_000 - estimate_tokens(request, 100), abs=1)


async def test_a_fleet_budget_whose_redis_is_away_is_kept_by_this_process() -> None:
    path = budgeted(BODY)
    tier = RedisTier(f"redis://127.0.0.1:{closed_port()}/0", timeout_s=0.2, circuit_s=5.0)
    try:
        path.limiter.share(tier)
        assert (await path.open(exchange())).body == BODY
        assert level(path) < 10_000  # the tenant's own bucket in this process was charged
    finally:
        await tier.close()
