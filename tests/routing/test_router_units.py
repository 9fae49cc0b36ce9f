"""Routing without I/O: weighted choice, fallbacks, rests, the retry budget and weight
changes."""

from __future__ import annotations

import random

import pytest

from sidecar.errors import InvalidRequest, SidecarError, Unavailable, UpstreamError, UpstreamStatus
from sidecar.routing.router import RetryBudget, Router, blames_target
from sidecar.routing.table import Route, RouteTable, Target
from sidecar.settings import RoutingSettings

A = Target("p", "a", 3)
B = Target("p", "b", 1)
DRAINED = Target("q", "drained", 0)
BACKUP = Target("q", "backup", 5, fallback_only=True)
LOCAL = Target("local", "small", 1, local=True)


def route(*targets: Target, seed: int = 1) -> Route:
    return Route("m", list(targets), random.Random(seed))


def test_a_target_has_a_label_and_a_json_form() -> None:
    assert A.label == "p/a"
    assert BACKUP.to_json() == {"provider": "q", "model": "backup", "weight": 5,
                                "fallback_only": True}


def test_choice_follows_the_weights_and_skips_drained_and_fallback_only() -> None:
    mixed = route(A, B, DRAINED, BACKUP, seed=7)
    counts = {A: 0, B: 0}
    for _ in range(4000):
        pick = mixed.choose()
        assert pick is not None
        counts[pick] += 1
    assert 2800 < counts[A] < 3200
    assert route(A).choose() is A
    assert route(A, DRAINED, BACKUP).choose() is A
    assert route(DRAINED, BACKUP).choose() is None


def test_choose_among_weighs_only_the_usable_rotation_targets() -> None:
    among = route(A, B, DRAINED, BACKUP, seed=3)
    assert among.choose_among([DRAINED, BACKUP]) is None
    assert among.choose_among([B, DRAINED]) is B
    counts = {A: 0, B: 0}
    for _ in range(4000):
        pick = among.choose_among([A, B])
        assert pick is not None
        counts[pick] += 1
    assert 2800 < counts[A] < 3200


def test_fallbacks_are_heaviest_first_fallback_only_last_drained_never() -> None:
    heavy = Target("p", "heavy", 10)
    assert route(B, DRAINED, BACKUP, A, heavy).fallbacks() == [heavy, A, B, BACKUP]
    zero_backup = Target("q", "zero", 0, fallback_only=True)
    assert route(A, zero_backup).fallbacks() == [A, zero_backup]


def test_long_prompts_skip_local_targets_when_another_can_serve() -> None:
    mixed = Route("m", [A, LOCAL], prefer_local_below_tokens=100)
    assert mixed.long_prompt(99) is None
    assert mixed.long_prompt(100) == [LOCAL]
    assert Route("m", [A, LOCAL]).long_prompt(10_000) is None
    assert Route("m", [LOCAL], prefer_local_below_tokens=100).long_prompt(500) is None
    assert Route("m", [A], prefer_local_below_tokens=100).long_prompt(500) is None


def test_the_retry_budget_starts_at_its_floor_and_fills_by_ratio() -> None:
    budget = RetryBudget(0.5, floor=2.0)
    assert budget.withdraw() and budget.withdraw()
    assert not budget.withdraw()
    assert budget.spent == 2 and budget.refused == 1
    budget.deposit()
    assert not budget.withdraw()
    budget.deposit()
    assert budget.balance == 1.0 and budget.withdraw()
    for _ in range(10):
        budget.deposit()
    assert budget.balance == 2.0


def settings(**changes: float) -> RoutingSettings:
    return RoutingSettings(**{"failures_before_cooldown": 2, "cooldown_s": 30.0, **changes})


def test_failures_in_a_row_rest_a_target_and_the_others_serve() -> None:
    router = Router(settings())
    pair = route(A, B)
    assert router.failed(A, UpstreamError("boom"))
    assert router.pick(pair, None, [B]) is A  # one failure: still in
    assert router.snapshot()["resting_targets_s"] == {}
    router.failed(A, UpstreamError("boom"))
    for _ in range(20):
        assert router.pick(pair, None) is B
    assert router.snapshot()["resting_targets_s"]["p/a"] > 29
    with pytest.raises(Unavailable):
        router.pick(pair, [B])


def test_a_429_rests_the_target_as_long_as_asked() -> None:
    router = Router(settings())
    limited = UpstreamStatus(429, "slow down", "rate_limit_error",
                             headers={"Retry-After": "7"})
    router.failed(A, limited)
    rest = router.snapshot()["resting_targets_s"]["p/a"]
    assert 6 < rest <= 7


def test_a_request_that_was_bad_does_not_count_against_the_target() -> None:
    router = Router(settings())
    bad = UpstreamStatus(400, "bad", "invalid_request_error")
    assert not router.failed(A, bad)
    assert router.snapshot()["resting_targets_s"] == {}
    assert not blames_target(InvalidRequest("x"))
    assert blames_target(UpstreamStatus(500, "x", "server_error"))
    assert blames_target(UpstreamStatus(503, "x", "server_error"))
    assert blames_target(UpstreamStatus(429, "x", "rate_limit_error"))
    assert not blames_target(UpstreamStatus(404, "x", "not_found_error"))
    assert blames_target(UpstreamError("x"))


def test_every_target_resting_is_a_503_with_the_shortest_wait() -> None:
    router = Router(settings(failures_before_cooldown=1))
    pair = route(A, B)
    router.failed(A, UpstreamStatus(429, "x", "rate_limit_error", headers={"Retry-After": "5"}))
    router.failed(B, UpstreamStatus(429, "x", "rate_limit_error", headers={"Retry-After": "9"}))
    with pytest.raises(Unavailable) as caught:
        router.pick(pair, None)
    error: SidecarError = caught.value
    assert error.code == "no_healthy_target" and error.headers["Retry-After"] == "5"
    assert "p/a" in error.message and "p/b" in error.message
    assert not router.has_candidate(pair, [])


def test_fallbacks_skip_what_was_tried_and_what_rests() -> None:
    router = Router(settings(failures_before_cooldown=1))
    three = route(A, B, BACKUP)
    assert router.pick(three, [A]) is B
    assert router.pick(three, [A, B]) is BACKUP
    assert router.has_candidate(three, [A, B])
    assert not router.has_candidate(three, [A, B, BACKUP])
    with pytest.raises(Unavailable):
        router.pick(three, [A, B, BACKUP])
    router.failed(B, UpstreamError("x"))
    assert router.pick(three, [A]) is BACKUP


def test_a_provider_down_takes_all_its_targets_out_until_it_is_up() -> None:
    router = Router(settings())
    pair = route(A, Target("r", "c", 1))
    router.provider_down("p", 60, "probe failed")
    for _ in range(10):
        assert router.pick(pair, None).provider == "r"
    assert router.snapshot()["providers_down_s"]["p"] > 59
    router.provider_up("p")
    assert router.snapshot()["providers_down_s"] == {}


def test_a_target_that_succeeds_after_its_rest_is_forgotten() -> None:
    router = Router(settings(failures_before_cooldown=2))
    router.failed(A, UpstreamError("x"))
    router.succeeded(A)
    router.failed(A, UpstreamError("x"))
    assert router.snapshot()["resting_targets_s"] == {}


def table() -> RouteTable:
    return RouteTable({"m": route(A, B, BACKUP)}, ["p", "q"])


def test_a_weight_change_applies_to_the_named_target_only() -> None:
    routes = table()
    before, after = routes.update("m", [{"provider": "p", "model": "b", "weight": 0}])
    assert [t["weight"] for t in before] == [3, 1, 5]
    assert [t["weight"] for t in after] == [3, 0.0, 5]
    changed = routes.get("m")
    assert changed is not None and changed.fallbacks()[-1] == BACKUP
    assert routes.names() == ["m"] and routes.get("x") is None
    assert routes.to_json()["m"][1]["weight"] == 0.0


@pytest.mark.parametrize(("change", "param"), [
    ({"provider": "nope"}, "targets[0].provider"),
    ({"provider": "p"}, "targets[0]"),  # two targets on p: which one?
    ({"provider": "p", "model": "a", "weight": -1}, "targets[0].weight"),
    ({"provider": "p", "model": "a", "weight": "1"}, "targets[0].weight"),
    ({"provider": "p", "model": "a", "weight": True}, "targets[0].weight"),
    ({"provider": "p", "model": "a", "fallback_only": 1}, "targets[0].fallback_only"),
    ({"provider": "p", "model": "a", "colour": "red"}, "targets[0]"),
])
def test_a_bad_change_is_refused_and_names_its_field(change: dict[str, object],
                                                     param: str) -> None:
    routes = table()
    with pytest.raises(InvalidRequest) as caught:
        routes.update("m", [change])
    assert caught.value.param == param
    assert routes.to_json()["m"][0]["weight"] == 3


def test_a_change_that_leaves_nothing_routable_is_refused() -> None:
    routes = table()
    with pytest.raises(InvalidRequest) as caught:
        routes.update("m", [{"provider": "p", "model": "a", "weight": 0},
                            {"provider": "p", "model": "b", "fallback_only": True}])
    assert caught.value.param == "targets"
    with pytest.raises(InvalidRequest) as unknown:
        routes.update("x", [])
    assert unknown.value.param == "model"
    with pytest.raises(InvalidRequest):
        routes.update("m", ["not an object"])  # type: ignore[list-item]
