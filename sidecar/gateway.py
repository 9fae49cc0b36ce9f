"""The one request path every front door uses, whatever protocol it speaks.

A front door parses its protocol into an `Exchange` and calls `Gateway.open`; the path checks
the model allow-list, reserves the tenant's token budget, answers from the cache or reaches a
target (a weighted healthy one; spill-over; fallback before the first byte inside one retry
budget), and returns an `Answer`, leaving a record of what happened on the request's context.
The front door writes the answer in its protocol and closes it. The path never writes to the
client, and knows nothing of HTTP beyond the headers it may read.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from time import perf_counter
from typing import TYPE_CHECKING

from sidecar.backends.base import Backend, Call
from sidecar.crossing import cross
from sidecar.errors import ModelNotFound, SidecarError, Spillable
from sidecar.exchange import OPENAI, Answer, Exchange, first_of
from sidecar.protocol.anthropic_messages import messages_usage
from sidecar.protocol.usage import usage_of
from sidecar.routing.router import Router
from sidecar.routing.table import Route, RouteTable, Target
from sidecar.security.jwt import Forbidden
from sidecar.security.limits import Budget, Limiter, SharedBudget

if TYPE_CHECKING:
    from sidecar.cache.answers import AnswerCache
    from sidecar.observability.record import RequestRecord


@dataclass(slots=True)
class Gateway:
    routes: RouteTable
    backends: Mapping[str, Backend]
    router: Router
    limiter: Limiter
    cache: AnswerCache | None = None
    # Requests each target ("provider/model") is answering now: a JSON answer until it has
    # arrived, a stream until it is closed.
    in_flight: dict[str, int] = field(default_factory=dict)
    # Note each answer's usage on the record even without a token budget (for the request's
    # log line and the metrics).
    count_usage: bool = False

    async def open(self, exchange: Exchange) -> Answer:
        context = exchange.context
        model = exchange.model
        context.record.model = model
        context.record.endpoint = exchange.endpoint
        if not context.principal.may_use(model):
            raise Forbidden(f"This token may not use the model `{model}`.",
                            param="model", code="model_not_allowed")
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFound(
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model")
        if self.limiter.tokens is None:  # the common case: reach a target, or the cache
            if self.cache is None or not exchange.cacheable:
                answer = await self.reach(exchange, route)
            else:
                answer = await self.cache.answer(exchange, lambda: self.reach(exchange, route))
            if self.count_usage and not answer.from_cache:
                if answer.events is None:
                    context.record.usage = usage_of(answer.body) \
                        if exchange.protocol == OPENAI else messages_usage(answer.body)
                else:
                    answer.events = _metered(answer.events, context.record, exchange.protocol,
                                             answer.first)
            return answer
        return await self._within_budget(exchange, route)

    async def _within_budget(self, exchange: Exchange, route: Route) -> Answer:
        """The tenant's token budget: the prompt estimate and the answer's limit are reserved
        first, and the reservation settled on the usage the answer reports (all of it comes
        back when no target served the request; it stands when the usage is unknown)."""
        limiter = self.limiter
        tenant = exchange.context.principal.tenant
        reserved = estimate_tokens(exchange, limiter.settings.default_max_tokens)
        budget: Budget | SharedBudget
        if limiter.shared_tokens is not None:
            budget = limiter.shared_tokens
            await budget.take(tenant, reserved)
        else:
            assert limiter.tokens is not None
            budget = limiter.tokens
            budget.take(tenant, reserved)
        try:
            if self.cache is None or not exchange.cacheable:
                answer = await self.reach(exchange, route)
            else:
                answer = await self.cache.answer(exchange, lambda: self.reach(exchange, route))
        except BaseException:
            budget.give_back(tenant, reserved)
            raise
        record = exchange.context.record
        if answer.from_cache:  # a hit spends no tokens
            budget.give_back(tenant, reserved)
            return answer
        if answer.events is None:
            record.usage = usage_of(answer.body) if exchange.protocol == OPENAI \
                else messages_usage(answer.body)
            used = record.usage[2] if record.usage is not None else reserved
            budget.give_back(tenant, reserved - used)
            return answer
        answer.events = _metered(answer.events, record, exchange.protocol, answer.first)

        def settle() -> None:
            used = record.usage[2] if record.usage is not None else reserved
            budget.give_back(tenant, reserved - used)

        answer._settle = settle
        return answer

    async def reach(self, exchange: Exchange, route: Route) -> Answer:
        """Try targets until one answers (its first event, for a stream)."""
        context = exchange.context
        record = context.record
        router = self.router
        router.budget.deposit()
        tried: list[Target] | None = None
        spilled: list[Target] | None = None
        # Local targets skipped, because the prompt is long.
        skip = route.long_prompt(len(exchange.body) // 4) if route.prefer_local_below_tokens \
            else None
        if skip:
            record.rule = "long_prompt"
        while True:
            target = router.pick(route, tried, skip)
            backend = self.backends[target.provider]
            # A target that speaks the front door's protocol gets the client's bytes; any
            # other, the request translated (sidecar/crossing.py).
            crossing = backend.protocol != exchange.protocol
            call = Call(exchange.endpoint, b"" if crossing else exchange.body_for(target),
                        context.request_id, context.timing, router.budget)
            if target.local:
                # A local engine that is loading keeps the request only if nothing else can.
                call.patient = not (route.spill_over and router.has_candidate(
                    route, [*(tried if tried is not None else skip or ()), target]))
            label = target.label
            in_flight = self.in_flight
            in_flight[label] = in_flight.get(label, 0) + 1
            try:
                if crossing:
                    answer = await cross(backend, call, exchange, target.model)
                elif exchange.stream:
                    answer = await first_of(backend, call)
                else:  # the common case, one coroutine less
                    answer = Answer(await backend.complete(call), None, None, exchange.protocol)
            except BaseException as exc:
                in_flight[label] -= 1
                if not isinstance(exc, SidecarError):
                    raise
                # Charged to this target unless another one answers after it.
                record.target = label
                record.fallback_from = _failed(tried, spilled, skip)
                after = [*(tried if tried is not None else skip or ()), target]
                if isinstance(exc, Spillable):
                    # Full or not ready: the next target, free of the retry budget.
                    if route.spill_over and router.has_candidate(route, after):
                        tried = after
                        spilled = [*(spilled or ()), target]
                        continue
                    raise
                if not router.failed(target, exc):
                    raise
                tried = after
                if not router.has_candidate(route, tried) or not router.budget.withdraw():
                    raise
                continue
            if answer.events is None:
                in_flight[label] -= 1
            else:
                answer._done = partial(_leave, in_flight, label)
            router.succeeded(target)
            record.first_byte_s = perf_counter() - context.timing.start
            record.target = label
            headers = answer.headers
            headers["X-Sidecar-Target"] = label
            failed = record.fallback_from = _failed(tried, spilled, skip)
            if failed:
                headers["X-Sidecar-Fallback-From"] = ", ".join(failed)
            if spilled:
                record.spill_over_from = [t.label for t in spilled]
                headers["X-Sidecar-Spill-Over-From"] = ", ".join(record.spill_over_from)
            return answer


def _failed(tried: list[Target] | None, spilled: list[Target] | None,
            skipped: list[Target] | None) -> list[str]:
    """The targets that failed before the one now tried (not those passed over as full, nor
    the local ones a long prompt skipped)."""
    if not tried:
        return []
    return [t.label for t in tried
            if (spilled is None or t not in spilled) and (skipped is None or t not in skipped)]


def _leave(in_flight: dict[str, int], label: str) -> None:
    in_flight[label] -= 1


async def _metered(events: AsyncGenerator[bytes, None], record: RequestRecord, protocol: str,
                   first: bytes | None = None) -> AsyncGenerator[bytes, None]:
    """Pass a stream on, noting the usage its chunks report (OpenAI's last chunk; Anthropic's
    message_start and message_delta, each with part of it). The first event, already read,
    is noted first: Anthropic's message_start, with the prompt's tokens."""
    try:
        if first is not None and b'"usage":{' in first:
            record.usage = usage_of(first) if protocol == OPENAI else \
                messages_usage(first, record.usage)
        async for data in events:
            if b'"usage":{' in data:
                record.usage = usage_of(data) if protocol == OPENAI else \
                    messages_usage(data, record.usage)
            yield data
    finally:
        await events.aclose()


def estimate_tokens(exchange: Exchange, default_max_tokens: int) -> int:
    """About four bytes of JSON per prompt token, plus the longest answer allowed."""
    prompt = len(exchange.body) // 4
    limit = exchange.max_output_tokens
    if limit == 0:
        return prompt
    return prompt + (limit or default_max_tokens) * exchange.choices


@dataclass(slots=True)
class Readiness:
    """Ready once every part started, and no longer while the server drains."""

    started: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.started and not self.draining


Fetch = Callable[[], Awaitable[Answer]]
