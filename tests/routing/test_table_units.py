"""The route table without I/O: routes built from the settings, weighted choice at its edges, and
the exact refusal of every malformed weight change (whatever sent it)."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest

from sidecar.errors import InvalidRequest
from sidecar.routing.table import MAX_WEIGHT, Route, RouteTable, Target
from sidecar.settings import Settings

A = Target("p", "a", 3)
B = Target("p", "b", 1)
C = Target("q", "c", 2)


class FixedRandom(random.Random):
    """Returns the given values in turn, so a test can place the point of a weighted pick."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def settings() -> Settings:
    return msgspec.convert({
        "providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"},
                      "l": {"kind": "local"}},
        "models": {"m": {"targets": [{"provider": "p"},
                                     {"provider": "l", "model": "x", "weight": 2,
                                      "fallback_only": True}],
                         "spill_over": False, "prefer_local_below_tokens": 50}},
    }, Settings)


def test_routes_from_settings_keep_every_target_field_and_route_rule() -> None:
    table = RouteTable.from_settings(settings())
    route = table.get("m")
    assert route is not None
    assert route.targets == [Target("p", "m", 1.0), Target("l", "x", 2.0, True, True)]
    assert [t.local for t in route.targets] == [False, True]
    assert route.spill_over is False and route.prefer_local_below_tokens == 50
    assert route.name == "m"
    assert table.names() == ["m"]
    # The providers known are the settings' ones: a change may name them.
    table.update("m", [{"provider": "l", "weight": 1}])


def test_a_route_built_by_hand_spills_over_and_has_no_long_prompt_rule() -> None:
    route = Route("m", [A])
    assert route.spill_over is True and route.prefer_local_below_tokens == 0
    assert not Target("p", "a", 1).fallback_only and not Target("p", "a", 1).local


@pytest.mark.parametrize(("point", "expected"), [(0.0, A), (0.74, A), (0.75, B), (0.99, B)])
def test_choose_places_each_target_in_its_share_of_the_weights(point: float,
                                                              expected: Target) -> None:
    assert Route("m", [A, B], FixedRandom(point)).choose() is expected


@pytest.mark.parametrize(("point", "expected"), [(0.0, A), (0.59, A), (0.6, C), (0.99, C)])
def test_choose_among_places_each_usable_target_in_its_share(point: float,
                                                            expected: Target) -> None:
    route = Route("m", [A, B, C], FixedRandom(point))
    assert route.choose_among([A, C]) is expected


def test_choose_among_with_the_point_at_the_very_end_takes_the_last() -> None:
    route = Route("m", [A, B, C], FixedRandom(1.0))
    assert route.choose_among([A, B, C]) is C


def test_a_route_with_one_weighted_target_always_chooses_it() -> None:
    route = Route("m", [Target("p", "z", 0), A, Target("q", "f", 9, fallback_only=True)],
                  FixedRandom())
    assert route.choose() is A


def test_a_table_lists_its_targets_as_json() -> None:
    table = RouteTable({"m": Route("m", [A, C])}, ["p", "q"])
    assert table.to_json() == {"m": [
        {"provider": "p", "model": "a", "weight": 3, "fallback_only": False},
        {"provider": "q", "model": "c", "weight": 2, "fallback_only": False}]}


def test_a_change_keeps_the_route_rules_and_the_local_flag() -> None:
    local = Target("l", "x", 1, local=True)
    table = RouteTable({"m": Route("m", [A, local], spill_over=False,
                                   prefer_local_below_tokens=9)}, ["p", "l"])
    before, after = table.update("m", [{"provider": "l", "weight": 4, "fallback_only": True}])
    assert before[1] == {"provider": "l", "model": "x", "weight": 1, "fallback_only": False}
    assert after[1] == {"provider": "l", "model": "x", "weight": 4.0, "fallback_only": True}
    route = table.get("m")
    assert route is not None and route.name == "m"
    assert route.targets[1] == Target("l", "x", 4.0, True, True)
    assert route.spill_over is False and route.prefer_local_below_tokens == 9


def test_a_change_of_fallback_only_alone_keeps_the_weight() -> None:
    table = RouteTable({"m": Route("m", [A, C])}, ["p", "q"])
    _, after = table.update("m", [{"provider": "q", "fallback_only": True}])
    assert after[1] == {"provider": "q", "model": "c", "weight": 2.0, "fallback_only": True}
    _, after = table.update("m", [{"provider": "q", "weight": 5}])
    assert after[1]["fallback_only"] is True


@pytest.mark.parametrize("weight", [0, MAX_WEIGHT, 0.5])
def test_weights_from_zero_to_the_maximum_are_accepted(weight: float) -> None:
    table = RouteTable({"m": Route("m", [A, C])}, ["p", "q"])
    _, after = table.update("m", [{"provider": "q", "weight": weight}])
    assert after[1]["weight"] == weight


def refusal(model: object, changes: object) -> InvalidRequest:
    table = RouteTable({"m": Route("m", [A, B, C])}, ["p", "q"])
    with pytest.raises(InvalidRequest) as caught:
        table.update(model, changes)
    assert table.to_json()["m"][0]["weight"] == 3  # all or nothing
    return caught.value


@pytest.mark.parametrize(
    ("model", "changes", "param", "message"),
    [
        (5, [], "model", "`model` must name a public model."),
        ("x", [], "model", "There is no model `x` to change."),
        ("m", {}, "targets", "`targets` must be a list of changes."),
        ("m", [{"provider": "q", "weight": 1}, 7], "targets[1]", "`targets[1]` must be an object."),
        ("m", [{"provider": "q", "b": 1, "a": 2}], "targets[0]",
         "`targets[0]` has unknown fields: a, b."),
        ("m", [{"provider": "z"}], "targets[0].provider",
         "`targets[0].provider`: unknown provider 'z'."),
        ("m", [{"provider": 3}], "targets[0].provider",
         "`targets[0].provider`: unknown provider 3."),
        ("m", [{"provider": "p", "model": 1}], "targets[0].model",
         "`targets[0].model` must be a string."),
        ("m", [{"provider": "p"}], "targets[0]",
         "`targets[0]` must name exactly one of `m`'s targets (found 2); add `model` to tell "
         "them apart."),
        ("m", [{"provider": "p", "model": "nope"}], "targets[0]",
         "`targets[0]` must name exactly one of `m`'s targets (found 0); add `model` to tell "
         "them apart."),
        ("m", [{"provider": "q", "weight": MAX_WEIGHT + 1}], "targets[0].weight",
         "`targets[0].weight` must be a number from 0 to 1000000."),
        ("m", [{"provider": "q", "weight": float("nan")}], "targets[0].weight",
         "`targets[0].weight` must be a number from 0 to 1000000."),
        ("m", [{"provider": "q", "fallback_only": "yes"}], "targets[0].fallback_only",
         "`targets[0].fallback_only` must be true or false."),
        ("m", [{"provider": "p", "model": "a", "weight": 0},
               {"provider": "p", "model": "b", "weight": 0},
               {"provider": "q", "weight": 0}], "targets",
         "The change would leave `m` with no routable target (every weight 0 or "
         "fallback-only)."),
    ],
)
def test_a_malformed_change_is_refused_with_a_message_naming_the_field(
        model: object, changes: Any, param: str, message: str) -> None:
    caught = refusal(model, changes)
    assert caught.param == param
    assert caught.message == message


def test_an_unknown_provider_name_is_cut_in_the_message() -> None:
    caught = refusal("m", [{"provider": "z" * 500}])
    assert len(caught.message) < 150


def test_a_target_made_here_is_labelled_provider_slash_model() -> None:
    assert Target("prov", "mod", 1).label == "prov/mod"
