"""GET /metrics: the Prometheus text (OpenMetrics when the Accept header asks), rendered in a
thread; with auth on it needs a token with the `sidecar:metrics` or the admin scope, unless it
is served on the separate loopback listener of `metrics.listen`. GET /admin/api/stats: rolling
1 and 5 minute windows per model and target, as JSON."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidecar.api.http import JSON
from sidecar.api.middleware import BrowserCheck
from sidecar.appkeys import BACKENDS, CACHE, GATEWAY, LIMITER, METRICS, REDIS, SETTINGS, VERIFIER
from sidecar.backends.local import LocalBackend
from sidecar.errors import RouteNotFound
from sidecar.observability.exposition import render
from sidecar.observability.windows import LATENCY_BOUNDS, SLOT_S, WINDOWS
from sidecar.security.jwt import Forbidden, Unauthorized

METRICS_SCOPE = "sidecar:metrics"
routes = web.RouteTableDef()


def scrape_handler(app: web.Application, *, loopback_listener: bool = False) -> Handler:
    """The /metrics handler for the main listener, or (`loopback_listener`) for the separate
    one, which asks for no token: only this machine reaches it."""
    settings = app[SETTINGS]
    verifier = app[VERIFIER]
    admin_scope = settings.auth.admin_scope
    # With auth off, what the edge refuses on /admin too: a page of another site reading the
    # numbers through a rebound DNS name.
    browsers = BrowserCheck(settings) if verifier is None and not loopback_listener else None

    async def scrape(request: web.Request) -> web.Response:
        if browsers is not None:
            browsers.check(request)
        elif verifier is not None and not loopback_listener:
            principal = await verifier.verify(_bearer(request))
            if METRICS_SCOPE not in principal.scopes and admin_scope not in principal.scopes:
                raise Forbidden(f"The token lacks the `{METRICS_SCOPE}` scope metrics need.")
        metrics = app[METRICS]
        assert metrics is not None  # the route exists only when metrics are on
        snapshot = metrics.snapshot(functools.partial(families, gather(app)))
        headers = request.headers
        body, content_type, gzipped = await asyncio.to_thread(
            render, snapshot, ",".join(headers.getall(hdrs.ACCEPT, [])),
            "gzip" in headers.get(hdrs.ACCEPT_ENCODING, ""))
        response = web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})
        if gzipped:
            response.headers[hdrs.CONTENT_ENCODING] = "gzip"
        return response

    return scrape


@routes.get("/admin/api/stats")
async def stats(request: web.Request) -> web.Response:
    """Rate, p50/p95 latency, error share and observed traffic share per model and target,
    over the last minute and the last five (5-second resolution)."""
    metrics = request.app[METRICS]
    if metrics is None:
        raise RouteNotFound("Metrics are off (metrics.enabled = false): no stats are kept.")
    body = await asyncio.to_thread(window_stats, metrics.windows.copy())
    return web.Response(body=orjson.dumps({"windows": body}), content_type=JSON)


def _bearer(request: web.Request) -> str:
    scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Metrics need an `Authorization: Bearer <token>` header.",
                           code="missing_token")
    return token.strip()


@dataclass(slots=True)
class Parts:
    """What the application's parts say at scrape time, read on the loop."""

    in_flight: int = 0
    target_in_flight: dict[str, int] = field(default_factory=dict)
    routing: dict[str, Any] = field(default_factory=dict)  # Router.snapshot()
    target_providers: dict[str, str] = field(default_factory=dict)  # target -> provider
    cache: dict[str, int] | None = None  # ResponseCache.counts
    redis: dict[str, Any] | None = None  # RedisTier.describe()
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)  # provider -> describe()


def gather(app: web.Application) -> Parts:
    metrics = app[METRICS]
    cache = app[CACHE]
    redis = app[REDIS]
    return Parts(
        in_flight=app[LIMITER].in_flight,
        target_in_flight=dict(app[GATEWAY].in_flight),
        routing=app[GATEWAY].router.snapshot(),
        target_providers=metrics.targets if metrics is not None else {},
        cache=dict(cache.counts) if cache is not None else None,
        redis=redis.describe() if redis is not None else None,
        engines={name: backend.engine.describe() for name, backend in app[BACKENDS].items()
                 if isinstance(backend, LocalBackend)})


def families(parts: Parts) -> Iterator[Metric]:
    """The parts' numbers as metric families: built in the render thread."""
    yield GaugeMetricFamily("llm_sidecar_requests_in_flight",
                            "Requests being handled now (the whole process).",
                            value=parts.in_flight)
    routing = parts.routing
    resting = GaugeMetricFamily("llm_sidecar_target_resting",
                                "1 for a target out of rotation: `failures` after "
                                "failures_before_cooldown in a row, `rate_limited` after a 429 "
                                "with Retry-After, `probe` when its provider did not answer the "
                                "probe.", labels=("target", "reason"))
    down = routing.get("providers_down_s", {})
    kinds = routing.get("resting_kinds", {})
    for target, provider in parts.target_providers.items():
        if target in routing.get("resting_targets_s", {}):
            resting.add_metric((target, kinds.get(target, "failures")), 1)
        elif provider in down:
            resting.add_metric((target, "probe"), 1)
    yield resting
    busy = GaugeMetricFamily("llm_sidecar_target_requests_in_flight",
                             "Requests a target is answering now (a stream until it ends).",
                             labels=("target",))
    for target in parts.target_providers:
        busy.add_metric((target,), parts.target_in_flight.get(target, 0))
    yield busy
    budget = routing.get("retry_budget", {})
    yield GaugeMetricFamily("llm_sidecar_retry_budget_balance",
                            "Retries and fallbacks the budget allows now.",
                            value=budget.get("balance", 0.0))
    yield CounterMetricFamily("llm_sidecar_retry_budget_spent",
                              "Retries and fallbacks the budget paid for.",
                              value=budget.get("spent", 0))
    yield CounterMetricFamily("llm_sidecar_retry_budget_refused",
                              "Retries and fallbacks refused because the budget was empty.",
                              value=budget.get("refused", 0))
    if parts.cache is not None:
        cache = CounterMetricFamily("llm_sidecar_cache_requests",
                                    "Cache look-ups by result (hit, miss, bypass; forged: a "
                                    "Redis record whose signature failed).", labels=("result",))
        for result, count in parts.cache.items():
            cache.add_metric((result,), count)
        yield cache
    if parts.redis is not None:
        yield CounterMetricFamily("llm_sidecar_cache_redis_failures",
                                  "Redis commands that failed or timed out.",
                                  value=parts.redis.get("failures", 0))
        yield GaugeMetricFamily("llm_sidecar_cache_redis_circuit_open",
                                "1 while Redis is not asked after a failure.",
                                value=0 if parts.redis.get("healthy") else 1)
    yield from _engines(parts.engines)


def _engines(engines: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    loaded = GaugeMetricFamily("llm_sidecar_engine_loaded",
                               "1 when the provider's local model is loaded and serving.",
                               labels=("provider", "engine", "model"))
    gauges = {key: GaugeMetricFamily(f"llm_sidecar_engine_{name}", text, labels=("provider",))
              for key, name, text in (
                  ("queue_depth", "queue_depth", "Jobs waiting for a place in the batch."),
                  ("active_jobs", "active_sequences", "Sequences being generated now."),
                  ("hung", "hung", "1 when jobs are active but no token came for stall_s."))}
    counters = {key: CounterMetricFamily(f"llm_sidecar_engine_{name}", text,
                                         labels=("provider",))
                for key, name, text in (
                    ("tokens_generated", "generated_tokens", "Tokens the engine generated."),
                    ("failed", "failures", "Generation jobs that failed."))}
    for provider, info in engines.items():
        loaded.add_metric((provider, str(info.get("engine", "")), str(info.get("model", ""))),
                          1 if info.get("state") == "ready" else 0)
        for key, gauge in gauges.items():
            gauge.add_metric((provider,), float(info.get(key) or 0))
        for key, counter in counters.items():
            counter.add_metric((provider,), float(info.get(key) or 0))
    yield loaded
    yield from gauges.values()
    yield from counters.values()


def window_stats(copied: tuple[int, dict[tuple[str, str], list[list[int]]]]
                 ) -> dict[str, list[dict[str, Any]]]:
    """Rate, p50/p95 latency, error share and traffic share per model and target, for each
    window; computed from a copy, off the loop. Latencies are a bucket's upper bound."""
    now, series = copied
    stats: dict[str, list[dict[str, Any]]] = {}
    for name, slots in WINDOWS.items():
        rows = []
        for (model, target), kept in series.items():
            recent = [row[1:] for row in kept if row[0] > now - slots]
            if not recent:
                continue
            total = [sum(column) for column in zip(*recent, strict=True)]
            rows.append({"model": model, "target": target, "requests": total[0],
                         "rate_per_s": round(total[0] / (slots * SLOT_S), 3),
                         "p50_ms": _percentile(total[2:], 0.50),
                         "p95_ms": _percentile(total[2:], 0.95),
                         "error_share": round(total[1] / total[0], 4)})
        served: dict[str, int] = {}
        for row in rows:
            if row["target"] not in ("none", "cache"):
                served[row["model"]] = served.get(row["model"], 0) + row["requests"]
        for row in rows:
            whole = served.get(row["model"], 0)
            row["traffic_share"] = round(row["requests"] / whole, 4) \
                if whole and row["target"] not in ("none", "cache") else None
        stats[name] = rows
    return stats


def _percentile(counts: list[int], q: float) -> float | None:
    total = sum(counts)
    if not total:
        return None
    seen = 0
    for i, count in enumerate(counts):
        seen += count
        if seen >= q * total:
            return round(LATENCY_BOUNDS[min(i, len(LATENCY_BOUNDS) - 1)] * 1000, 3)
    return None
