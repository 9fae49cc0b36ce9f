"""Public model name -> weighted targets, and changes to the weights while serving."""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from sidecar.errors import InvalidRequest
from sidecar.settings import LocalProviderSettings, Settings

# The largest weight a target may have, as in the TOML (TargetSettings.weight): a route's
# weights must add up to a finite number, or every pick would fail.
MAX_WEIGHT = 1_000_000


@dataclass(frozen=True, slots=True)
class Target:
    provider: str
    model: str  # the upstream's own model id
    weight: float
    fallback_only: bool = False
    local: bool = False  # served by an engine in this process
    label: str = field(init=False)  # "provider/model", as headers and logs show it

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", f"{self.provider}/{self.model}")

    def to_json(self) -> dict[str, Any]:
        return {"provider": self.provider, "model": self.model, "weight": self.weight,
                "fallback_only": self.fallback_only}


class Route:
    """The targets of one public model name. `choose` picks among the weighted (not
    fallback-only) targets at random in proportion to weight, skipping those `usable` refuses."""

    __slots__ = ("_cumulative", "_only", "_random", "_rotation", "_total", "name",
                 "prefer_local_below_tokens", "spill_over", "targets")

    def __init__(self, name: str, targets: list[Target], rng: random.Random | None = None, *,
                 spill_over: bool = True, prefer_local_below_tokens: int = 0) -> None:
        self.name = name
        self.targets = targets
        # A local target that is full or not ready passes the request to the others.
        self.spill_over = spill_over
        # Prompts estimated longer than this skip the local targets (0: no such rule).
        self.prefer_local_below_tokens = prefer_local_below_tokens
        self._random = (rng or random.Random()).random
        self._rotation = [t for t in targets if t.weight > 0 and not t.fallback_only]
        self._only = self._rotation[0] if len(self._rotation) == 1 else None
        self._cumulative = list(accumulate(t.weight for t in self._rotation))
        self._total = self._cumulative[-1] if self._rotation else 0.0

    def choose(self) -> Target | None:
        """A weighted pick with every target available; None when none is in rotation."""
        if self._only is not None:
            return self._only
        if not self._rotation:
            return None
        return self._rotation[bisect_right(self._cumulative, self._random() * self._total)]

    def choose_among(self, usable: Iterable[Target]) -> Target | None:
        """A weighted pick among `usable` rotation targets (slow path: some are out)."""
        pool = [t for t in usable if t.weight > 0 and not t.fallback_only]
        if not pool:
            return None
        point = self._random() * sum(t.weight for t in pool)
        for target in pool:
            point -= target.weight
            if point < 0:
                return target
        return pool[-1]

    def long_prompt(self, estimated_tokens: int) -> list[Target] | None:
        """The local targets to skip for a prompt this long, when the rule applies and
        another target can take it."""
        limit = self.prefer_local_below_tokens
        if not limit or estimated_tokens < limit:
            return None
        local = [t for t in self.targets if t.local]
        if not local or len(local) == len(self.targets):
            return None
        return local

    def fallbacks(self) -> list[Target]:
        """Every target with a weight, heaviest first, fallback-only ones last."""
        live = [t for t in self.targets if t.weight > 0 or t.fallback_only]
        return sorted(live, key=lambda t: (t.fallback_only, -t.weight))


class RouteTable:
    def __init__(self, routes: dict[str, Route], providers: Iterable[str]) -> None:
        self._routes = routes
        self._providers = frozenset(providers)

    @classmethod
    def from_settings(cls, settings: Settings) -> RouteTable:
        routes = {}
        local = {name for name, p in settings.providers.items()
                 if isinstance(p, LocalProviderSettings)}
        for name, entry in settings.models.items():
            targets = [Target(t.provider, t.model or name, t.weight, t.fallback_only,
                              t.provider in local)
                       for t in entry.targets]
            routes[name] = Route(name, targets, spill_over=entry.spill_over,
                                 prefer_local_below_tokens=entry.prefer_local_below_tokens)
        return cls(routes, settings.providers)

    def get(self, name: str) -> Route | None:
        return self._routes.get(name)

    def names(self) -> list[str]:
        return list(self._routes)

    def to_json(self) -> dict[str, list[dict[str, Any]]]:
        return {name: [t.to_json() for t in route.targets] for name, route in self._routes.items()}

    def update(self, model: object, changes: object) -> tuple[list[Any], list[Any]]:
        """Change weights and fallback_only of a model's existing targets, all or nothing.

        Each change names a target by `provider` (and `model` when a provider serves several)
        and sets `weight` and/or `fallback_only`. Returns (before, after) as JSON. Whatever
        the change's source (the admin API, the state file, another sidecar), anything else
        is an InvalidRequest that names the field.
        """
        if not isinstance(model, str):
            raise InvalidRequest("`model` must name a public model.", param="model")
        route = self._routes.get(model)
        if route is None:
            raise InvalidRequest(f"There is no model `{model}` to change.", param="model")
        if not isinstance(changes, list):
            raise InvalidRequest("`targets` must be a list of changes.", param="targets")
        targets = list(route.targets)
        for i, change in enumerate(changes):
            where = f"targets[{i}]"
            if not isinstance(change, Mapping):
                raise InvalidRequest(f"`{where}` must be an object.", param=where)
            unknown = set(change) - {"provider", "model", "weight", "fallback_only"}
            if unknown:
                raise InvalidRequest(f"`{where}` has unknown fields: {', '.join(sorted(unknown))}.",
                                     param=where)
            provider = change.get("provider")
            if not isinstance(provider, str) or provider not in self._providers:
                raise InvalidRequest(f"`{where}.provider`: unknown provider {provider!r:.100}.",
                                     param=f"{where}.provider")
            if not isinstance(change.get("model", ""), str):
                raise InvalidRequest(f"`{where}.model` must be a string.", param=f"{where}.model")
            matches = [j for j, t in enumerate(targets) if t.provider == provider
                       and ("model" not in change or t.model == change["model"])]
            if len(matches) != 1:
                raise InvalidRequest(
                    f"`{where}` must name exactly one of `{model}`'s targets "
                    f"(found {len(matches)}); add `model` to tell them apart.", param=where)
            current = targets[matches[0]]
            weight = change.get("weight", current.weight)
            # `not 0 <= weight` also refuses NaN, which no comparison holds for.
            if isinstance(weight, bool) or not isinstance(weight, int | float) \
                    or not 0 <= weight <= MAX_WEIGHT:
                raise InvalidRequest(
                    f"`{where}.weight` must be a number from 0 to {MAX_WEIGHT}.",
                    param=f"{where}.weight")
            fallback_only = change.get("fallback_only", current.fallback_only)
            if not isinstance(fallback_only, bool):
                raise InvalidRequest(f"`{where}.fallback_only` must be true or false.",
                                     param=f"{where}.fallback_only")
            targets[matches[0]] = Target(current.provider, current.model, float(weight),
                                         fallback_only, current.local)
        if not any(t.weight > 0 and not t.fallback_only for t in targets):
            raise InvalidRequest(
                f"The change would leave `{model}` with no routable target (every weight 0 or "
                "fallback-only).", param="targets")
        before = [t.to_json() for t in route.targets]
        self._routes[model] = Route(model, targets, spill_over=route.spill_over,
                                    prefer_local_below_tokens=route.prefer_local_below_tokens)
        return before, [t.to_json() for t in targets]
