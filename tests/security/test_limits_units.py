"""Budgets and the in-flight cap without I/O: what a bucket holds, refills, refuses and gets
back."""

from __future__ import annotations

import pytest

from sidecar.errors import RateLimited, Unavailable
from sidecar.security.limits import Budget, Limiter
from sidecar.settings import LimitsSettings


def test_a_bucket_starts_full_and_refuses_past_its_level() -> None:
    budget = Budget(120, "tokens")
    assert budget.capacity == 120.0 and budget.rate == 2.0
    budget.take("t", 120, now=0.0)
    with pytest.raises(RateLimited) as refused:
        budget.take("t", 1, now=0.0)
    assert refused.value.status == 429
    assert refused.value.headers["Retry-After"] == "1"
    assert "120 tokens per minute" in refused.value.message
    assert "0.5s" in refused.value.message


def test_the_wait_is_rounded_up_to_whole_seconds() -> None:
    budget = Budget(60, "requests")
    budget.take("t", 60, now=0.0)
    with pytest.raises(RateLimited) as refused:
        budget.take("t", 3.5, now=0.0)
    assert refused.value.headers["Retry-After"] == "4"
    with pytest.raises(RateLimited) as refused:
        budget.take("t", 3, now=0.0)
    assert refused.value.headers["Retry-After"] == "3"


def test_exactly_the_level_left_may_be_taken() -> None:
    budget = Budget(60, "requests")
    budget.take("t", 30, now=0.0)
    budget.take("t", 30, now=0.0)
    budget.take("t", 2, now=2.0)  # two seconds refilled two
    with pytest.raises(RateLimited):
        budget.take("t", 0.5, now=2.0)


def test_a_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    budget = Budget(60, "requests")
    budget.take("t", 60, now=0.0)
    budget.take("t", 10, now=10.0)
    with pytest.raises(RateLimited):
        budget.take("t", 1, now=10.0)
    budget.take("t", 60, now=1000.0)  # full again, and no more than full
    with pytest.raises(RateLimited):
        budget.take("t", 1, now=1000.0)


def test_a_bucket_refills_per_minute_over_sixty_a_second() -> None:
    budget = Budget(120, "tokens")  # two a second
    budget.take("t", 120, now=0.0)
    budget.take("t", 10, now=5.0)
    with pytest.raises(RateLimited) as refused:
        budget.take("t", 1, now=5.0)
    assert "0.5s" in refused.value.message


def test_only_buckets_full_by_now_are_forgotten_at_any_rate() -> None:
    budget = Budget(120, "tokens")  # two a second
    budget.take("spent", 120, now=100.0)
    budget.take("nearly", 1, now=100.0)
    budget._forget_full(100.5)  # nearly refilled its one token in half a second; spent did not
    assert list(budget._buckets) == ["spent"]


def test_tenants_have_their_own_buckets() -> None:
    budget = Budget(10, "requests")
    budget.take("alice", 10, now=0.0)
    budget.take("bob", 10, now=0.0)
    with pytest.raises(RateLimited):
        budget.take("alice", 1, now=0.0)


def test_more_than_a_minute_of_budget_is_refused_as_too_large() -> None:
    budget = Budget(100, "tokens")
    assert budget.too_large(100) is None
    refused = budget.too_large(101)
    assert refused is not None and refused.code == "rate_limit_exceeded"
    assert "needs 101 tokens, more than the 100 a minute" in refused.message
    with pytest.raises(RateLimited) as caught:
        budget.take("t", 101, now=0.0)
    assert caught.value.code == "rate_limit_exceeded"
    assert "Retry-After" not in caught.value.headers


def test_what_was_not_used_comes_back_and_no_more_than_capacity() -> None:
    budget = Budget(100, "tokens")
    budget.take("t", 80, now=0.0)
    budget.give_back("t", 50)
    budget.take("t", 70, now=0.0)
    with pytest.raises(RateLimited):
        budget.take("t", 1, now=0.0)
    budget.give_back("t", 1000)
    budget.take("t", 100, now=0.0)
    with pytest.raises(RateLimited):
        budget.take("t", 1, now=0.0)
    budget.give_back("t", -10)  # used more than reserved: taken now
    budget.give_back("nobody", 10)  # no bucket: nothing to settle
    budget.take("nobody", 100, now=0.0)


def test_full_buckets_are_forgotten_when_there_are_too_many() -> None:
    budget = Budget(60, "requests")
    for i in range(100_000):
        budget.take(f"t{i}", 1, now=0.0)
    budget.take("busy", 60, now=119.5)  # the 100,001st tenant: the full ones go first
    assert list(budget._buckets) == ["busy"]
    budget.take("late", 1, now=120.0)
    assert sorted(budget._buckets) == ["busy", "late"]
    with pytest.raises(RateLimited):
        budget.take("busy", 1, now=120.0)  # one not full keeps its level
    with pytest.raises(RateLimited):
        budget.take("late", 60, now=120.0)


def test_the_limiter_builds_only_the_budgets_configured() -> None:
    none = Limiter(LimitsSettings())
    assert none.requests is None and none.tokens is None
    both = Limiter(LimitsSettings(requests_per_minute=5, tokens_per_minute=7))
    assert both.requests is not None and both.requests.capacity == 5
    assert both.requests.what == "requests"
    assert both.tokens is not None and both.tokens.capacity == 7 and both.tokens.what == "tokens"
    assert both.shared_requests is None and both.shared_tokens is None


def test_the_in_flight_cap_refuses_at_once_and_frees_on_leave() -> None:
    limiter = Limiter(LimitsSettings(max_concurrent_requests=2))
    limiter.enter()
    limiter.enter()
    with pytest.raises(Unavailable) as refused:
        limiter.enter()
    assert refused.value.code == "overloaded" and refused.value.headers["Retry-After"] == "1"
    assert "limit of 2 requests" in refused.value.message
    assert limiter.in_flight == 2
    limiter.leave()
    assert limiter.in_flight == 1
    limiter.enter()
    limiter.leave()
    limiter.leave()
    assert limiter.in_flight == 0
