"""Router outcomes without I/O: how long and why a target rests, what the admin snapshot and
the 503 say about it, and which Retry-After values an upstream can make a target rest for."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import pytest

from sidecar.errors import SidecarError, Unavailable, UpstreamError, UpstreamStatus
from sidecar.routing.router import Router, _retry_after
from sidecar.routing.table import Route, Target
from sidecar.settings import RoutingSettings

A = Target("p", "a", 3)
B = Target("p", "b", 1)
C = Target("r", "c", 1)


def route(*targets: Target) -> Route:
    return Route("m", list(targets), random.Random(1))


def router(**changes: Any) -> Router:
    return Router(RoutingSettings(**{"failures_before_cooldown": 2, "cooldown_s": 30.0,
                                     "retry_budget_ratio": 0.5, **changes}))


def limited(seconds: str) -> UpstreamStatus:
    return UpstreamStatus(429, "slow down", "rate_limit_error", code="rate_limited",
                          headers={"Retry-After": seconds})


def refusal(chooser: Router, pair: Route, tried: list[Target] | None = None) -> SidecarError:
    with pytest.raises(Unavailable) as caught:
        chooser.pick(pair, tried)
    return caught.value


def test_a_rate_limited_target_rests_with_its_reason_and_kind_in_the_snapshot() -> None:
    chooser = router()
    assert chooser.failed(A, limited("7"))
    snap = chooser.snapshot()
    assert snap["resting_reasons"] == {"p/a": "rate_limited"}
    assert snap["resting_kinds"] == {"p/a": "rate_limited"}
    assert set(snap["resting_targets_s"]) == {"p/a"}


def test_failures_in_a_row_rest_for_the_cooldown_with_kind_failures() -> None:
    chooser = router()
    chooser.failed(A, UpstreamError("boom", code="upstream_unreachable"))
    chooser.failed(A, UpstreamError("boom", code="upstream_unreachable"))
    snap = chooser.snapshot()
    assert 29 < snap["resting_targets_s"]["p/a"] <= 30
    assert snap["resting_kinds"] == {"p/a": "failures"}
    assert snap["resting_reasons"] == {"p/a": "upstream_unreachable"}


def test_a_reason_without_a_code_is_the_error_type() -> None:
    chooser = router(failures_before_cooldown=1)
    chooser.failed(A, UpstreamStatus(502, "bad gateway", "server_error"))
    assert chooser.snapshot()["resting_reasons"] == {"p/a": "server_error"}


def test_a_503_with_retry_after_rests_as_asked_once_failures_add_up() -> None:
    chooser = router()
    unavailable = UpstreamStatus(503, "busy", "server_error", headers={"Retry-After": "4"})
    chooser.failed(A, unavailable)
    assert chooser.snapshot()["resting_targets_s"] == {}
    chooser.failed(A, unavailable)
    assert 3 < chooser.snapshot()["resting_targets_s"]["p/a"] <= 4


def test_a_429_without_retry_after_is_an_ordinary_failure() -> None:
    chooser = router()
    plain = UpstreamStatus(429, "slow down", "rate_limit_error")
    chooser.failed(A, plain)
    assert chooser.snapshot()["resting_targets_s"] == {}
    chooser.failed(A, plain)
    assert chooser.snapshot()["resting_kinds"] == {"p/a": "failures"}


def test_no_upstream_makes_a_target_rest_longer_than_max_rest() -> None:
    chooser = router(max_rest_s=60.0)
    chooser.failed(A, limited("86400"))
    assert 59 < chooser.snapshot()["resting_targets_s"]["p/a"] <= 60


def test_the_failure_count_starts_again_after_a_rest() -> None:
    chooser = router(failures_before_cooldown=2, cooldown_s=0.05)
    chooser.failed(A, UpstreamError("x"))
    chooser.failed(A, UpstreamError("x"))
    time.sleep(0.06)
    chooser.failed(A, UpstreamError("x"))
    # One failure since the rest was set: not enough for another.
    assert chooser.snapshot()["resting_targets_s"] == {}


def test_a_long_reason_is_cut_and_scrubbed_of_credentials() -> None:
    chooser = router(failures_before_cooldown=1)
    chooser.failed(A, UpstreamError("x", code="e" * 150))
    assert chooser.snapshot()["resting_reasons"]["p/a"] == "e" * 100
    chooser.provider_down("r", 60, "key sk-" + "a" * 40)
    error = refusal(chooser, route(A, C))
    assert "sk-aaaa" not in error.message


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("7", 7.0), ("0", 0.0), ("2.5", 2.5), (None, None), ("soon", None), ("-1", None),
     ("inf", None), ("nan", None)],
)
def test_only_a_finite_non_negative_retry_after_is_honoured(value: str | None,
                                                            seconds: float | None) -> None:
    headers = {} if value is None else {"Retry-After": value}
    assert _retry_after(UpstreamStatus(429, "x", "rate_limit_error", headers=headers)) == seconds


def test_the_503_lists_every_target_with_why_it_is_out_and_the_shortest_wait() -> None:
    chooser = router(failures_before_cooldown=1)
    pair = route(A, C)
    chooser.failed(A, limited("5.2"))
    chooser.provider_down("r", 9, "probe_failed")
    error = refusal(chooser, pair)
    assert error.message == (
        "Every target of `m` is failing or resting (p/a: rate_limited; r/c: probe_failed); "
        "try again in 6s.")
    assert error.headers == {"Retry-After": "6"}
    assert error.status == 503


def test_a_target_only_tried_is_said_to_be_tried_and_the_wait_is_at_least_a_second() -> None:
    chooser = router()
    pair = route(A, B)
    error = refusal(chooser, pair, [A, B])
    assert error.message == (
        "Every target of `m` is failing or resting (p/a: tried; p/b: tried); try again in 1s.")
    assert error.headers["Retry-After"] == "1"


def test_a_provider_that_is_up_again_shows_the_targets_own_reason() -> None:
    chooser = router(failures_before_cooldown=1)
    chooser.failed(A, limited("30"))
    chooser.provider_down("p", 60, "probe_failed")
    chooser.provider_up("p")
    error = refusal(chooser, route(A), None)
    assert "(p/a: rate_limited)" in error.message
    assert "try again in 30s" in error.message


def test_a_first_go_avoids_the_skipped_target() -> None:
    chooser = router()
    pair = route(A, B)
    for _ in range(20):
        assert chooser.pick(pair, None, [A]) is B


def test_a_skipped_target_is_not_taken_even_when_every_other_one_rests() -> None:
    chooser = router(failures_before_cooldown=1)
    chooser.failed(B, UpstreamError("x"))
    with pytest.raises(Unavailable) as caught:
        chooser.pick(route(A, B), None, [A])  # A is healthy, but skipped
    assert caught.value.code == "no_healthy_target"


def test_a_success_while_resting_does_not_end_the_rest() -> None:
    chooser = router(failures_before_cooldown=1)
    chooser.failed(A, UpstreamError("x"))
    chooser.succeeded(A)
    assert set(chooser.snapshot()["resting_targets_s"]) == {"p/a"}
    assert chooser.pick(route(A, B), None) is B


def test_the_snapshot_shows_the_retry_budget() -> None:
    chooser = router()
    chooser.budget.balance = 1.23456
    assert chooser.budget.withdraw()
    assert not chooser.budget.withdraw()
    assert chooser.snapshot()["retry_budget"] == {"balance": 0.235, "spent": 1, "refused": 1}


def test_a_provider_down_shows_its_remaining_seconds_and_leaves_after_its_time() -> None:
    chooser = router()
    chooser.provider_down("p", 30, "probe_failed")
    chooser.provider_down("r", 0, "probe_failed")
    down = chooser.snapshot()["providers_down_s"]
    assert set(down) == {"p"} and 29 < down["p"] <= 30
    assert chooser.pick(route(C), None) is C


def test_every_refused_retry_is_counted() -> None:
    chooser = router()
    chooser.budget.balance = 0.0
    assert not chooser.budget.withdraw()
    assert not chooser.budget.withdraw()
    assert chooser.budget.refused == 2


def test_a_target_is_usable_again_at_the_instant_its_rest_ends() -> None:
    chooser = router(failures_before_cooldown=1)
    chooser.failed(A, UpstreamError("x"))
    until = chooser._targets["p/a"].resting_until
    assert not chooser.usable(A, until - 0.001)
    assert chooser.usable(A, until)
    chooser.provider_down("r", 10, "probe_failed")
    down_until = chooser._providers_down["r"][0]
    assert not chooser.usable(C, down_until - 0.001)
    assert chooser.usable(C, down_until)


def test_the_wait_is_the_shortest_rest_rounded_up_even_under_a_second() -> None:
    chooser = router(failures_before_cooldown=1)
    chooser.failed(A, limited("0.5"))
    chooser.failed(C, limited("5"))
    assert refusal(chooser, route(A, C)).headers["Retry-After"] == "1"


def test_a_provider_down_alone_sets_the_wait() -> None:
    chooser = router()
    chooser.provider_down("r", 9, "probe_failed")
    error = refusal(chooser, route(C))
    assert error.headers["Retry-After"] == "9"
    assert "(r/c: probe_failed)" in error.message


def test_a_success_clears_the_failures_counted_so_far() -> None:
    chooser = router(failures_before_cooldown=2)
    chooser.succeeded(B)  # never failed: nothing to forget
    chooser.failed(A, UpstreamError("x"))
    chooser.succeeded(A)
    chooser.failed(A, UpstreamError("x"))
    assert chooser.snapshot()["resting_targets_s"] == {}


def test_a_provider_never_down_can_be_marked_up() -> None:
    chooser = router()
    chooser.provider_up("never-down")
    assert chooser.snapshot()["providers_down_s"] == {}


def test_a_target_that_starts_resting_is_logged_with_its_wait_and_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    chooser = router()
    with caplog.at_level(logging.WARNING, logger="sidecar.routing"):
        chooser.failed(A, limited("2.5"))
    (record,) = [r for r in caplog.records if r.name == "sidecar.routing"]
    assert record.getMessage() == "target resting"
    fields = record.__dict__["fields"]
    assert set(fields) == {"target", "seconds", "reason"}
    assert fields["target"] == "p/a" and fields["reason"] == "rate_limited"
    assert fields["seconds"] == 2.5


def test_the_snapshot_shows_a_rest_under_a_second_as_it_is() -> None:
    chooser = router()
    chooser.failed(A, limited("0.5"))
    assert 0.4 < chooser.snapshot()["resting_targets_s"]["p/a"] <= 0.5


def test_the_retry_budget_fills_by_the_configured_ratio() -> None:
    chooser = router(retry_budget_ratio=0.25)
    chooser.budget.balance = 0.0
    chooser.budget.deposit()
    assert chooser.budget.balance == 0.25


def test_with_one_target_resting_the_others_share_by_weight() -> None:
    chooser = router(failures_before_cooldown=1)
    three = Route("m", [A, B, C], random.Random(5))
    chooser.failed(A, UpstreamError("x"))
    picks = [chooser.pick(three, None).label for _ in range(400)]
    assert set(picks) == {"p/b", "r/c"}
    # B and C weigh the same: each takes about half, also when the first pick was A.
    assert 150 < picks.count("r/c") < 250


def test_a_quiet_router_may_retry_ten_times_before_its_ratio_applies() -> None:
    chooser = router()
    assert [chooser.budget.withdraw() for _ in range(11)] == [True] * 10 + [False]


def test_the_logged_rest_is_rounded_to_milliseconds(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sidecar.routing"):
        router().failed(A, limited("2.0004"))
    (record,) = [r for r in caplog.records if r.name == "sidecar.routing"]
    assert record.__dict__["fields"]["seconds"] == 2.0
