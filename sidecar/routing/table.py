"""Public model name -> weighted targets."""

from __future__ import annotations

import random
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate

from sidecar.config import Settings


@dataclass(frozen=True, slots=True)
class Target:
    provider: str
    model: str  # the upstream's own model id
    weight: float
    label: str = field(init=False)  # "provider/model", as headers and logs show it

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", f"{self.provider}/{self.model}")


class Route:
    """The targets of one public model name, chosen at random in proportion to their weights."""

    __slots__ = ("_cumulative", "_only", "_random", "_total", "name", "targets")

    def __init__(self, name: str, targets: list[Target], rng: random.Random | None = None) -> None:
        self.name = name
        self._random = (rng or random.Random()).random
        self.targets = targets
        live = [t for t in targets if t.weight > 0]
        self._only = live[0] if len(live) == 1 else None
        self._cumulative = list(accumulate(t.weight for t in targets))
        self._total = self._cumulative[-1] if targets else 0.0

    def choose(self) -> Target:
        if self._only is not None:
            return self._only
        point = self._random() * self._total
        return self.targets[bisect_right(self._cumulative, point)]


class RouteTable:
    def __init__(self, routes: dict[str, Route]) -> None:
        self._routes = routes

    @classmethod
    def from_settings(cls, settings: Settings) -> RouteTable:
        routes = {}
        for name, entry in settings.models.items():
            targets = [Target(t.provider, t.model or name, t.weight) for t in entry.targets]
            routes[name] = Route(name, targets)
        return cls(routes)

    def get(self, name: str) -> Route | None:
        return self._routes.get(name)

    def names(self) -> list[str]:
        return list(self._routes)
