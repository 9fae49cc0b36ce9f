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

# The sparkline's box, in SVG user units.
SPARK_WIDTH = 120
SPARK_HEIGHT = 24


@dataclass(slots=True)
class TargetView:
    provider: str
    model: str
    label: str
    weight: float
    configured_weight: float | None
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
        """The live weight is not the TOML's (changed from the page, the API or the fleet)."""
        return self.configured_weight is None or self.configured_weight != self.weight


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
    resting, reasons = routing["resting_targets_s"], routing["resting_reasons"]
    down = routing["providers_down_s"]
    engine_states = {name: info for name, info in engines(app).items()}
    by_key = {(row["model"], row["target"]): row for row in rows}
    views = []
    for name in gateway.routes.names():
        route = gateway.routes.get(name)
        if route is None:
            continue
        configured = {(t["provider"], t["model"]): float(t["weight"])
                      for t in configured_targets(app, name)}
        in_rotation = [t for t in route.targets if t.weight > 0 and not t.fallback_only]
        live_total = sum(t.weight for t in in_rotation)
        toml_total = sum(w for (p, m), w in configured.items()
                         if not _fallback_only(app, name, p, m))
        view = RouteView(name)
        for target in route.targets:
            state, why = "serving", ""
            if target.provider in engine_states:
                engine = engine_states[target.provider]
                if engine["state"] != "ready":
                    state, why = engine["state"], engine.get("load_error") or ""
            if target.provider in down:
                state, why = "down", f"the probe got no answer ({down[target.provider]:.0f} s)"
            if target.label in resting:
                state = "resting"
                why = f"{reasons.get(target.label, 'failed')} ({resting[target.label]:.0f} s)"
            toml_weight = configured.get((target.provider, target.model))
            row = by_key.get((name, target.label), {})
            view.targets.append(TargetView(
                provider=target.provider, model=target.model, label=target.label,
                weight=target.weight, configured_weight=toml_weight,
                fallback_only=target.fallback_only, state=state, why=why,
                in_flight=gateway.in_flight.get(target.label, 0),
                rate_per_s=row.get("rate_per_s"), p50_ms=row.get("p50_ms"),
                p95_ms=row.get("p95_ms"), error_share=row.get("error_share"),
                observed_share=row.get("traffic_share"),
                configured_share=_share(toml_weight, toml_total, target.fallback_only),
                live_share=_share(target.weight, live_total, target.fallback_only),
                sparkline=lines.get((name, target.label), "")))
        views.append(view)
    return views


def _fallback_only(app: web.Application, model: str, provider: str, upstream: str) -> bool:
    return any(t["fallback_only"] for t in configured_targets(app, model)
               if t["provider"] == provider and t["model"] == upstream)


def _share(weight: float | None, total: float, fallback_only: bool) -> float | None:
    if weight is None or fallback_only or not total or not math.isfinite(total):
        return None
    return weight / total
