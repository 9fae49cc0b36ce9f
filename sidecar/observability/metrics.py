"""Prometheus metrics from the record every request leaves: counted on the event loop with plain
dicts keyed by label tuples (the loop is the only writer, so no locks), copied at scrape time,
and rendered by prometheus_client in a thread (exposition.py) so that a scrape never stalls
the loop.

Names follow the OpenTelemetry GenAI semantic conventions in Prometheus form, then the
sidecar's own under `llm_sidecar_`. Every label value comes from the config (models, targets,
providers) or a fixed set; a model name nobody configured is counted as `other`, and no tenant,
key or free text is ever a label.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import Metric

from sidecar.errors import RateLimited, SidecarError
from sidecar.observability.exposition import (
    COUNTERS,
    HISTOGRAMS,
    TOKEN_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    Key,
    Snapshot,
)
from sidecar.observability.windows import (
    DURATION_BUCKETS,
    DURATION_OF,
    LATENCY_BOUNDS,
    SLOT_S,
    Windows,
)

if TYPE_CHECKING:
    from sidecar.observability.record import RequestRecord
    from sidecar.observability.timing import RequestContext
    from sidecar.settings import Settings

# The same as integers: a token count is compared with an int faster than with a float; and
# the bucket of every count up to 4,096 (most answers, most prompts), looked up, not searched.
_TOKEN_LIMITS = tuple(int(bound) for bound in TOKEN_BUCKETS)
_TOKEN_BUCKET_OF = tuple(bisect_left(_TOKEN_LIMITS, count) for count in range(4097))



# The path of each front door's endpoint: (front door, gen_ai.operation.name).
OPERATIONS = {
    "/v1/chat/completions": ("openai", "chat"),
    "/v1/completions": ("openai", "text_completion"),
    "/v1/embeddings": ("openai", "embeddings"),
    "/v1/messages": ("anthropic", "chat"),
    "/v1/messages/count_tokens": ("anthropic", "count_tokens"),
}
_OTHER_API = ("openai", "other")
# Why a stream stopped early, as a label: the codes this package's errors carry and
# client_gone. Anything else (an upstream's own code) is `other`.


def _codes(kind: type[SidecarError]) -> Iterator[str]:
    yield kind.type
    if kind.code is not None:
        yield kind.code
    for sub in kind.__subclasses__():
        yield from _codes(sub)


_STREAM_ERRORS = frozenset(["client_gone", *_codes(SidecarError)])
_CACHE_STATES = frozenset(["", "hit", "miss", "bypass"])


class Histogram:
    """Bucket counts per label tuple; the row is [count per bucket..., +Inf, sum] (counts are
    ints, the sum a float: each addition then takes the interpreter's fast path)."""

    __slots__ = ("bounds", "series")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.series: dict[Key, list[float]] = {}

    def row(self, key: Key) -> list[float]:
        row = self.series.get(key)
        if row is None:
            row = self.series[key] = [0] * (len(self.bounds) + 1) + [0.0]
        return row


def _add(row: list[float], bounds: tuple[float, ...], value: float) -> None:
    row[bisect_left(bounds, value)] += 1  # the first bound >= value: `le` semantics
    row[-1] += value


def _cell(values: dict[Key, list[int]], key: Key) -> list[int]:
    cell = values.get(key)
    if cell is None:
        cell = values[key] = [0]
    return cell


class _Shape:
    """The rows one kind of request moves (same operation, model, target, status, stream and
    ending), found once and kept: a request then costs a look-up and a few additions.

    Its latencies are counted in the windows' fine buckets (`latency`, and the sum in
    `elapsed`); the duration histogram, the request counter and the target's selections are
    summed from them when read, so a request places its latency once and counts nothing else
    twice."""

    __slots__ = ("disconnects", "duration_key", "elapsed", "failed", "latency", "model",
                 "requests_key", "served", "slot_end", "slot_row", "target", "tokens_cached",
                 "tokens_in", "tokens_out", "tpot", "ttft", "upstream")

    latency: list[int]
    elapsed: float
    requests_key: Key
    duration_key: Key
    slot_end: float  # the current window slot's row, until this time
    slot_row: list[int]
    failed: bool
    model: str
    target: str
    served: bool
    disconnects: list[int] | None
    upstream: list[float]  # the rest only for a request a target answered
    ttft: list[float] | None
    tokens_in: list[float]
    tokens_out: list[float]
    tokens_cached: list[float]
    tpot: list[float] | None


class Metrics:
    """What requests did, since start. `observe` runs once per request, on the loop."""

    def __init__(self, settings: Settings) -> None:
        self.models = frozenset(settings.models)
        # Every target's label and its provider: the only target label values.
        self.targets = {f"{t.provider}/{t.model or name}": t.provider
                        for name, entry in settings.models.items() for t in entry.targets}
        self.counters: dict[str, dict[Key, list[int]]] = {name: {} for name in COUNTERS}
        self.histograms = {name: Histogram(spec[2]) for name, spec in HISTOGRAMS.items()}
        self.windows = Windows()
        self._shapes: dict[tuple[Any, ...], _Shape] = {}
        self._known: dict[tuple[Any, ...], _Shape] = {}  # by the record's own values
        self.tls_cert = settings.server.tls_cert
        self._expiry: dict[tuple[str, float], float] = {}  # the render thread's alone

    def _model(self, name: str) -> str:
        return name if name in self.models else ("other" if name else "")

    def _target(self, label: str) -> str:
        return label if label in self.targets else "other"

    def observe(self, path: str, context: RequestContext, status: int,
                error: SidecarError | None, now: float) -> None:
        """Count one finished request (its answer written, failed, or abandoned: 499), which
        ended at `now` (perf_counter)."""
        record = context.record
        # Most requests repeat one of a few shapes: one look-up by what the record says.
        shape = self._known.get((path, record.model, record.target, status, record.stream,
                                 record.stream_error, record.cache))
        if shape is None:
            shape = self._shape_of(path, record, status)
            if shape is None:
                return  # health checks, the admin API and scrapes are not traffic
        elapsed = now - context.timing.start
        shape.elapsed += elapsed
        bucket = bisect_left(LATENCY_BOUNDS, elapsed)
        shape.latency[bucket] += 1
        if now >= shape.slot_end:
            self._next_slot(shape, now)
        counts = shape.slot_row
        counts[0] += 1
        if shape.failed:
            counts[1] += 1
        counts[2 + bucket] += 1
        if error is not None or shape.disconnects is not None or record.fallback_from \
                or record.spill_over_from:
            self._rarer(record, error, shape, now)
        if not shape.served:
            return
        waited = context.timing.upstream
        row = shape.upstream
        row[bisect_left(DURATION_BUCKETS, waited)] += 1
        row[-1] += waited
        first = record.first_byte_s
        if shape.ttft is not None and first is not None:
            row = shape.ttft
            row[bisect_left(TTFT_BUCKETS, first)] += 1
            row[-1] += first
        usage = record.usage
        if usage is not None:
            tokens = usage[0]
            row = shape.tokens_in
            row[_TOKEN_BUCKET_OF[tokens] if 0 <= tokens <= 4096
                else bisect_left(_TOKEN_LIMITS, tokens)] += 1
            row[-1] += tokens
            tokens = usage[1]
            row = shape.tokens_out
            row[_TOKEN_BUCKET_OF[tokens] if 0 <= tokens <= 4096
                else bisect_left(_TOKEN_LIMITS, tokens)] += 1
            row[-1] += tokens
            if usage[3] >= 0:  # the answer said how many prompt tokens came from a cache
                row = shape.tokens_cached
                row[bisect_left(_TOKEN_LIMITS, usage[3])] += 1
                row[-1] += usage[3]
            if shape.tpot is not None and first is not None and tokens > 1:
                _add(shape.tpot, TPOT_BUCKETS, (elapsed - first) / (tokens - 1))

    def _next_slot(self, shape: _Shape, now: float) -> None:
        """The window slot `now` falls in, for this shape's rows from now on."""
        slot = int(now // SLOT_S)
        shape.slot_row = self.windows.row(shape.model, shape.target, slot)
        shape.slot_end = (slot + 1) * SLOT_S

    def _shape_of(self, path: str, record: RequestRecord, status: int) -> _Shape | None:
        """The shape of a request not seen before: its labels made bounded (a model nobody
        configured is `other`), and kept under the record's own values only when those are
        already bounded, so that no client-chosen string grows the table."""
        operation = OPERATIONS.get(path)
        if operation is None:
            if not path.startswith("/v1/"):
                return None
            operation = _OTHER_API
        model = record.model
        if model not in self.models:
            model = "other" if model else ""
        ended = record.stream_error
        if ended and ended not in _STREAM_ERRORS:
            ended = "other"
        # Every part of the key is bounded: configured names, fixed sets, HTTP statuses.
        key = (operation, model, record.target, status, record.stream, ended,
               record.cache == "hit")
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = self._shape(*key)
        if operation is not _OTHER_API and model == record.model and ended == record.stream_error \
                and (not record.target or record.target in self.targets) \
                and record.cache in _CACHE_STATES and 100 <= status <= 599:
            self._known[(path, record.model, record.target, status, record.stream,
                         record.stream_error, record.cache)] = shape
        return shape

    def _shape(self, operation: tuple[str, str], model: str, served: str, status: int,
               stream: bool, ended: str, hit: bool) -> _Shape:
        door, name = operation
        counters, histograms = self.counters, self.histograms
        shape = _Shape()
        shape.model = model
        shape.requests_key = (door, name, model, f"{status // 100}xx",
                              "true" if stream else "false")
        target = shape.target = self._target(served) if served else ("cache" if hit else "none")
        error_type = str(status) if status >= 400 else ended
        shape.duration_key = (name, target, model, error_type)
        shape.latency = [0] * (len(LATENCY_BOUNDS) + 1)
        shape.elapsed = 0.0
        shape.slot_end = 0.0
        shape.slot_row = []
        # A client that left is not the target's failure.
        shape.failed = error_type not in ("", "499", "client_gone")
        shape.disconnects = _cell(counters["llm_sidecar_client_disconnects"], (model, target)) \
            if stream and (status == 499 or ended == "client_gone") else None
        shape.served = bool(served)
        if not served:
            return shape
        shape.upstream = histograms["llm_sidecar_upstream_duration_seconds"].row((target,))
        genai = (name, target, model)
        shape.ttft = histograms["gen_ai_server_time_to_first_token_seconds"].row(genai) \
            if stream else None
        tokens = histograms["gen_ai_client_token_usage"]
        shape.tokens_in = tokens.row((*genai, "input"))
        shape.tokens_out = tokens.row((*genai, "output"))
        shape.tokens_cached = tokens.row((*genai, "cache_read"))
        shape.tpot = histograms["gen_ai_server_time_per_output_token_seconds"].row(genai) \
            if stream and not error_type else None
        return shape

    def _rarer(self, record: RequestRecord, error: SidecarError | None, shape: _Shape,
               now: float) -> None:
        """Refusals, disconnects, fallbacks and spill-overs: not on every request."""
        counters = self.counters
        if isinstance(error, RateLimited):
            # The request budget is taken before the path; the token budget inside it.
            _cell(counters["llm_sidecar_rate_limit_refusals"],
                  ("tokens" if record.endpoint else "requests",))[0] += 1
        elif error is not None and error.code == "overloaded":
            _cell(counters["llm_sidecar_rate_limit_refusals"], ("concurrency",))[0] += 1
        if shape.disconnects is not None:
            shape.disconnects[0] += 1
        for label in record.fallback_from:
            before = self._target(label)
            if shape.served:
                _cell(counters["llm_sidecar_fallbacks"], (before, shape.target))[0] += 1
            row = self.windows.row(shape.model, before, int(now // SLOT_S))
            row[0] += 1
            row[1] += 1
        if shape.served:
            for label in record.spill_over_from:
                _cell(counters["llm_sidecar_spill_overs"],
                      (self._target(label), shape.target))[0] += 1

    def snapshot(self, parts: Callable[[], Iterator[Metric]]) -> Snapshot:
        """A copy of the numbers, taken on the loop, for a thread to render."""
        counters = {name: {k: cell[0] for k, cell in values.items()}
                    for name, values in self.counters.items()}
        histograms = {name: {k: row.copy() for k, row in h.series.items()}
                      for name, h in self.histograms.items()}
        # What each shape's latencies hold: its requests, its target's selections, and the
        # duration histogram (shapes that differ only in what the labels leave out add up).
        requests = counters["llm_sidecar_requests"]
        selected = counters["llm_sidecar_target_selected"]
        durations = histograms["gen_ai_client_operation_duration_seconds"]
        for shape in self._shapes.values():
            seen = sum(shape.latency)
            if not seen:
                continue
            requests[shape.requests_key] = requests.get(shape.requests_key, 0) + seen
            if shape.served:
                key = (shape.model, shape.target)
                selected[key] = selected.get(key, 0) + seen
            row = durations.get(shape.duration_key)
            if row is None:
                row = durations[shape.duration_key] = [0] * (len(DURATION_BUCKETS) + 1) + [0.0]
            for bucket, count in enumerate(shape.latency):
                if count:
                    row[DURATION_OF[bucket]] += count
            row[-1] += shape.elapsed
        return Snapshot(counters, histograms, self.certificate_expiry, parts)

    def certificate_expiry(self) -> float | None:
        """The TLS certificate's notAfter as a Unix time, read again when the file changes
        (SIGHUP reloads it). Called from the render thread: it reads a file."""
        if not self.tls_cert:
            return None
        try:
            stamp = Path(self.tls_cert).stat().st_mtime
            known = self._expiry.get((self.tls_cert, stamp))
            if known is None:
                from cryptography import x509

                cert = x509.load_pem_x509_certificate(Path(self.tls_cert).read_bytes())
                known = cert.not_valid_after_utc.timestamp()
                self._expiry.clear()
                self._expiry[(self.tls_cert, stamp)] = known
        except (OSError, ValueError):
            return None
        return known
