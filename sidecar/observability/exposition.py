"""What a scrape exports: the names, help texts, labels and bucket boundaries of the metrics
observed per request (OpenTelemetry's GenAI conventions in Prometheus form, then the sidecar's
own), and their rendering, in a thread, from a copy taken on the loop."""

from __future__ import annotations

import gzip
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from sidecar import __version__
from sidecar.observability.windows import DURATION_BUCKETS

Key = tuple[str, ...]

# OpenTelemetry's recommended boundaries (the request duration's are in windows.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0)
TOKEN_BUCKETS = (1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0,
                 1048576.0, 4194304.0, 16777216.0, 67108864.0)

# name, help, label names: the counters and histograms observed per request.
_GENAI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "llm_sidecar_requests": ("Requests answered, by front door, operation, model, status class "
                             "and whether streamed.", ("front_door", "operation", "model",
                                                       "status_class", "stream")),
    "llm_sidecar_target_selected": ("Requests a target answered.", ("model", "target")),
    "llm_sidecar_fallbacks": ("A target failed before the first byte and another answered.",
                              ("from_target", "to_target")),
    "llm_sidecar_spill_overs": ("A local target was full or not ready and another answered.",
                                ("from_target", "to_target")),
    "llm_sidecar_client_disconnects": ("Clients that left in the middle of a stream.",
                                       ("model", "target")),
    "llm_sidecar_rate_limit_refusals": ("Requests refused by a tenant's request or token budget "
                                        "(429), or by the process's cap on requests in flight "
                                        "(503).", ("limit",)),
}
HISTOGRAMS: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "gen_ai_client_operation_duration_seconds": (
        "Duration of a request, from its arrival to the end of its answer.",
        (*_GENAI, "error_type"), DURATION_BUCKETS),
    "gen_ai_server_time_to_first_token_seconds": (
        "Time to a stream's first event, for streams a target answered.", _GENAI, TTFT_BUCKETS),
    "gen_ai_server_time_per_output_token_seconds": (
        "Time per output token after the first, for streams that reported their usage.",
        _GENAI, TPOT_BUCKETS),
    "gen_ai_client_token_usage": ("Tokens used per request, as the answer's usage reports them.",
                                  (*_GENAI, "gen_ai_token_type"), TOKEN_BUCKETS),
    "llm_sidecar_upstream_duration_seconds": (
        "Time a request waited for its target's bytes (an upstream's, or a local engine's "
        "tokens).", ("target",), DURATION_BUCKETS),
}


@dataclass(slots=True)
class Snapshot:
    counters: dict[str, dict[Key, int]]
    histograms: dict[str, dict[Key, list[float]]]
    expiry: Callable[[], float | None]  # the served certificate's notAfter (reads a file)
    # The families of what the application's parts say, gathered on the loop at scrape time.
    parts: Callable[[], Iterator[Metric]]

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's Collector protocol: the families, built from the copy."""
        for name, (text, labels) in COUNTERS.items():
            family = CounterMetricFamily(name, text, labels=labels)
            for key, value in self.counters[name].items():
                family.add_metric(key, value)
            yield family
        for name, (text, labels, bounds) in HISTOGRAMS.items():
            histogram = HistogramMetricFamily(name, text, labels=labels)
            edges = [*(repr(b) for b in bounds), "+Inf"]
            for key, row in self.histograms[name].items():
                cumulative, buckets = 0.0, []
                for edge, count in zip(edges, row, strict=False):
                    cumulative += count
                    buckets.append((edge, cumulative))
                histogram.add_metric(key, buckets, row[-1])
            yield histogram
        yield from self.parts()
        expiry = self.expiry()
        if expiry is not None:
            yield GaugeMetricFamily("llm_sidecar_tls_certificate_expiry_timestamp_seconds",
                                    "When the served TLS certificate expires (Unix time).",
                                    value=expiry)
        info = InfoMetricFamily("llm_sidecar_build", "The running version.")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info


def render(snapshot: Snapshot, accept: str, gzip_ok: bool) -> tuple[bytes, str, bool]:
    """The exposition the Accept header asks for (OpenMetrics or Prometheus text), gzipped
    when the scraper takes it. Runs in a thread."""
    encoder, content_type = choose_encoder(accept)
    body = encoder(snapshot)
    if gzip_ok and len(body) >= 1024:
        return gzip.compress(body, 5), content_type, True
    return body, content_type, False
