"""What the admin page shows, read from the parts that already keep it: the route table and
the router (weights, rests), the gateway's in-flight counts, the metrics' rolling windows (the
same numbers as GET /admin/api/stats), the cache, Redis and the engines. Plain data for the
templates; nothing here changes anything."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sidecar.api.admin_changes import configured_targets, local_backends
from sidecar.api.metrics import window_stats
from sidecar.appkeys import CACHE, GATEWAY, METRICS, REDIS
from sidecar.observability.windows import SLOTS
from sidecar.routing.table import Target

# The sparkline's box, in SVG user units.
SPARK_WIDTH = 120
SPARK_HEIGHT = 24


@dataclass(slots=True)
class TargetView:
    provider: str
    model: str
    label: str
    weight: float
    configured_weight: float | None  # None: the TOML has no such target
    configured_fallback_only: bool
    fallback_only: bool
    state: str  # serving, resting, down, loading, unloaded
    why: str  # the reason of a rest or an engine's state, "" when serving
    in_flight: int = 0
    rate_per_s: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    error_share: float | None = None
    observed_share: float | None = None
    configured_share: float | None = None
    live_share: float | None = None
    sparkline: str = ""  # SVG polyline points, drawn here so the page needs no chart library

    @property
    def differs(self) -> bool:
        """The live target is not the TOML's (changed from the page, the API or the fleet)."""
        return self.configured_weight != self.weight \
            or self.configured_fallback_only != self.fallback_only


@dataclass(slots=True)
class RouteView:
    name: str
    targets: list[TargetView] = field(default_factory=list)

    @property
    def differs(self) -> bool:
        return any(t.differs for t in self.targets)


@dataclass(slots=True)
class Overview:
    routes: list[RouteView]
    cache: dict[str, Any] | None
    hit_ratio: float | None
    redis: dict[str, Any] | None
    engines: dict[str, dict[str, Any]]
    metrics_on: bool


async def overview(app: web.Application) -> Overview:
    """Everything the overview and the routing page show. The windows are copied on the loop
    and summed in a thread, as /admin/api/stats does."""
    metrics = app[METRICS]
    stats: dict[str, list[dict[str, Any]]] = {}
    lines: dict[tuple[str, str], str] = {}
    if metrics is not None:
        stats, lines = await asyncio.to_thread(_summed, metrics.windows.copy())
    cache = app[CACHE]
    counts = cache.describe() if cache is not None else None
    looked_up = (counts["hit"] + counts["miss"]) if counts is not None else 0
    redis = app[REDIS]
    return Overview(
        routes=_routes(app, stats.get("5m", []), lines),
        cache=counts,
        hit_ratio=counts["hit"] / looked_up if counts is not None and looked_up else None,
        redis=redis.describe() if redis is not None else None,
        engines=engines(app),
        metrics_on=metrics is not None)


def engines(app: web.Application) -> dict[str, dict[str, Any]]:
    return {name: b.engine.describe() for name, b in local_backends(app).items()}


def _summed(copied: tuple[int, dict[tuple[str, str], list[list[int]]]]
            ) -> tuple[dict[str, list[dict[str, Any]]], dict[tuple[str, str], str]]:
    return window_stats(copied), sparklines(copied)


def sparklines(copied: tuple[int, dict[tuple[str, str], list[list[int]]]]
               ) -> dict[tuple[str, str], str]:
    """Requests per 5-second slot over the last five minutes, per model and target, as the
    points of an SVG polyline (oldest on the left; the tallest slot fills the box)."""
    now, series = copied
    drawn = {}
    for key, kept in series.items():
        counts = [0] * SLOTS
        for row in kept:
            age = now - row[0]
            if 0 <= age < SLOTS:
                counts[SLOTS - 1 - age] = row[1]
        top = max(counts) or 1
        step = SPARK_WIDTH / (SLOTS - 1)
        drawn[key] = " ".join(
            f"{i * step:.1f},{SPARK_HEIGHT - 1 - (SPARK_HEIGHT - 2) * c / top:.1f}"
            for i, c in enumerate(counts))
    return drawn


def _routes(app: web.Application, rows: list[dict[str, Any]],
            lines: dict[tuple[str, str], str]) -> list[RouteView]:
    gateway = app[GATEWAY]
    routing = gateway.router.snapshot()
    engine_states = engines(app)
    by_key = {(row["model"], row["target"]): row for row in rows}
    views = []
    for name in gateway.routes.names():
        route = gateway.routes.get(name)
        if route is None:
            continue
        toml = {(t["provider"], t["model"]): t for t in configured_targets(app, name)}
        live_total = sum(t.weight for t in route.targets if not t.fallback_only)
        toml_total = sum(float(t["weight"]) for t in toml.values() if not t["fallback_only"])
        view = RouteView(name)
        for target in route.targets:
            state, why = _state(target, engine_states, routing)
            in_toml = toml.get((target.provider, target.model), {})
            toml_weight = float(in_toml["weight"]) if in_toml else None
            toml_fallback = bool(in_toml.get("fallback_only"))
            row = by_key.get((name, target.label), {})
            view.targets.append(TargetView(
                provider=target.provider, model=target.model, label=target.label,
                weight=target.weight, configured_weight=toml_weight,
                configured_fallback_only=toml_fallback, fallback_only=target.fallback_only,
                state=state, why=why, in_flight=gateway.in_flight.get(target.label, 0),
                rate_per_s=row.get("rate_per_s"), p50_ms=row.get("p50_ms"),
                p95_ms=row.get("p95_ms"), error_share=row.get("error_share"),
                observed_share=row.get("traffic_share"),
                configured_share=_share(toml_weight, toml_total, toml_fallback),
                live_share=_share(target.weight, live_total, target.fallback_only),
                sparkline=lines.get((name, target.label), "")))
        views.append(view)
    return views


def _state(target: Target, engine_states: dict[str, dict[str, Any]],
           routing: dict[str, Any]) -> tuple[str, str]:
    """serving, resting (why, for how long), down by the probe, or its engine's state."""
    resting = routing["resting_targets_s"]
    if target.label in resting:
        reason = routing["resting_reasons"].get(target.label, "failed")
        return "resting", f"{reason} ({resting[target.label]:.0f} s)"
    down = routing["providers_down_s"]
    if target.provider in down:
        return "down", f"the probe got no answer ({down[target.provider]:.0f} s)"
    engine = engine_states.get(target.provider)
    if engine is not None and engine["state"] != "ready":
        return str(engine["state"]), str(engine.get("load_error") or "")
    return "serving", ""


def _share(weight: float | None, total: float, fallback_only: bool) -> float | None:
    if weight is None or fallback_only or not total or not math.isfinite(total):
        return None
    return weight / total
