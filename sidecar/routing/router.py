"""Health-aware choice: targets that keep failing rest for a while, fallbacks are tried in
weight order before the first byte, and a retry budget keeps a failing upstream from
multiplying the load. No upstream decides alone how long a target rests (at most
`routing.max_rest_s`), and the reasons kept for the admin API, the log and the next client's
503 are scrubbed of anything shaped like a credential."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from sidecar.errors import (
    SidecarError,
    Unavailable,
    UpstreamError,
    UpstreamStatus,
)
from sidecar.routing.table import Route, Target
from sidecar.security.scrub import scrub
from sidecar.settings import RoutingSettings

log = logging.getLogger("sidecar.routing")
# A rest reason is an upstream's error code or type: a word, not a message.
_REASON_CHARS = 100


class RetryBudget:
    """Each request deposits `ratio` of a retry; a retry or fallback spends a whole one. The
    balance starts at, and never exceeds, `floor`, so a quiet sidecar may still retry a few
    times while a busy one retries at most `ratio` of its requests."""

    def __init__(self, ratio: float, floor: float = 10.0) -> None:
        self.ratio = ratio
        self.floor = floor
        self.balance = floor
        self.spent = 0
        self.refused = 0

    def deposit(self) -> None:
        balance = self.balance + self.ratio
        self.balance = balance if balance < self.floor else self.floor

    def withdraw(self) -> bool:
        if self.balance >= 1.0:
            self.balance -= 1.0
            self.spent += 1
            return True
        self.refused += 1
        return False


class TargetHealth:
    __slots__ = ("failures", "kind", "reason", "resting_until")

    def __init__(self) -> None:
        self.failures = 0
        self.resting_until = 0.0
        self.reason = ""
        # Why it rests, as a fixed word a metric label can carry: "rate_limited" (a 429
        # with Retry-After) or "failures" (failures_before_cooldown in a row).
        self.kind = ""


class Router:
    def __init__(self, settings: RoutingSettings) -> None:
        self.settings = settings
        self.budget = RetryBudget(settings.retry_budget_ratio)
        self._targets: dict[str, TargetHealth] = {}
        self._providers_down: dict[str, tuple[float, str]] = {}

    # -- choice ------------------------------------------------------------------------

    def usable(self, target: Target, now: float) -> bool:
        state = self._targets.get(target.label)
        if state is not None and state.resting_until > now:
            return False
        down = self._providers_down.get(target.provider)
        return down is None or down[0] <= now

    def pick(self, route: Route, tried: list[Target] | None,
             skip: list[Target] | None = None) -> Target:
        """The next target for a request that already tried `tried` (None on the first go).
        A first go never takes a target in `skip` (the local targets a long prompt passes
        over): they count as tried, so with every other target failing or resting it is the
        same 503, as the gateway expects when it adds them to what a request tried."""
        if not tried:
            first = route.choose()
            if (first is not None and skip is None and not self._targets
                    and not self._providers_down):
                return first  # nothing fails or rests anywhere: the common case, no clock read
            now = time.monotonic()
            if first is not None and (skip is None or first not in skip) and self.usable(
                    first, now):
                return first
            chosen = route.choose_among(t for t in route.targets if self.usable(t, now)
                                        and (skip is None or t not in skip))
            if chosen is not None:
                return chosen
            tried = list(skip or ())
        else:
            now = time.monotonic()
        for target in route.fallbacks():
            if target not in tried and self.usable(target, now):
                return target
        raise self._all_down(route, now, tried)

    def has_candidate(self, route: Route, tried: list[Target]) -> bool:
        now = time.monotonic()
        return any(t not in tried and self.usable(t, now) for t in route.fallbacks())

    def _all_down(self, route: Route, now: float, tried: list[Target]) -> SidecarError:
        waits = [self._rest_left(t, now) for t in route.targets if t not in tried]
        waits = [w for w in waits if w > 0]
        retry_after = max(1, math.ceil(min(waits))) if waits else 1
        reasons = "; ".join(f"{t.label}: {self._why(t)}" for t in route.targets)
        return Unavailable(
            f"Every target of `{route.name}` is failing or resting ({reasons}); try again in "
            f"{retry_after}s.",
            code="no_healthy_target",
            headers={"Retry-After": str(retry_after)},
        )

    def _rest_left(self, target: Target, now: float) -> float:
        state = self._targets.get(target.label)
        resting = state.resting_until if state is not None else 0.0
        down = self._providers_down.get(target.provider, (0.0, ""))[0]
        return max(resting, down) - now

    def _why(self, target: Target) -> str:
        down = self._providers_down.get(target.provider)
        if down is not None and down[0] > time.monotonic():
            return down[1]
        state = self._targets.get(target.label)
        return state.reason if state is not None and state.reason else "tried"

    # -- outcomes ----------------------------------------------------------------------

    def succeeded(self, target: Target) -> None:
        state = self._targets.get(target.label)
        if state is not None and state.resting_until <= time.monotonic():
            del self._targets[target.label]  # healthy again: keep the common case empty

    def failed(self, target: Target, error: SidecarError) -> bool:
        """Count a failure the target is to blame for; False when the request itself was bad
        (then neither a cooldown nor a fallback would help)."""
        if not blames_target(error):
            return False
        state = self._targets.setdefault(target.label, TargetHealth())
        state.failures += 1
        state.reason = _reason(error.code or error.type)
        asked = _retry_after(error)
        now = time.monotonic()
        if asked is not None and error.status == 429:
            rest, state.kind = asked, "rate_limited"
        elif state.failures >= self.settings.failures_before_cooldown:
            rest, state.kind = asked or self.settings.cooldown_s, "failures"
        else:
            return True
        state.resting_until = now + min(rest, self.settings.max_rest_s)
        state.failures = 0
        log.warning("target resting", extra={"fields": {
            "target": target.label, "seconds": round(state.resting_until - now, 3),
            "reason": state.reason}})
        return True

    def provider_down(self, provider: str, seconds: float, reason: str) -> None:
        self._providers_down[provider] = (time.monotonic() + seconds, _reason(reason))

    def provider_up(self, provider: str) -> None:
        self._providers_down.pop(provider, None)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """What the admin API shows: who rests and why (scrubbed when it was recorded), who is
        down, and the retry budget."""
        now = time.monotonic()
        resting = {label: max(0.0, s.resting_until - now) for label, s in self._targets.items()
                   if s.resting_until > now}
        reasons = {label: self._targets[label].reason or "failed" for label in resting}
        kinds = {label: self._targets[label].kind or "failures" for label in resting}
        down = {p: until - now for p, (until, _) in self._providers_down.items() if until > now}
        budget = self.budget
        return {"resting_targets_s": resting, "resting_reasons": reasons, "resting_kinds": kinds,
                "providers_down_s": down,
                "retry_budget": {"balance": round(budget.balance, 3), "spent": budget.spent,
                                 "refused": budget.refused}}


def blames_target(error: SidecarError) -> bool:
    if isinstance(error, UpstreamStatus):
        return error.status in (429, 503, 504) or error.status >= 500
    return isinstance(error, UpstreamError)


def _retry_after(error: SidecarError) -> float | None:
    """The seconds an error's Retry-After asks for; None unless a finite number >= 0 (a
    backend passes on numbers only, but this is the last word before a rest is set)."""
    value = error.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _reason(text: str) -> str:
    return scrub(text[:_REASON_CHARS])
