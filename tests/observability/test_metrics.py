"""Metrics, end to end: the sidecar as a real process, real requests, and real scrapes of
/metrics parsed with prometheus_client's own parsers. Each test compares two scrapes and
checks that the counters moved by exactly what its requests did."""

from __future__ import annotations

import asyncio
import json
import random
import re
import string
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.support.sidecar import ROOT, Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "Hello there"}]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Moved = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# What one request can move: counters, and the number of observations of each histogram.
COUNTED = (
    "llm_sidecar_requests_total", "llm_sidecar_target_selected_total",
    "llm_sidecar_fallbacks_total", "llm_sidecar_spill_overs_total",
    "llm_sidecar_client_disconnects_total", "llm_sidecar_rate_limit_refusals_total",
    "llm_sidecar_cache_requests_total", "llm_sidecar_retry_budget_spent_total",
    "gen_ai_client_operation_duration_seconds_count",
    "gen_ai_server_time_to_first_token_seconds_count",
    "gen_ai_server_time_per_output_token_seconds_count",
    "gen_ai_client_token_usage_count", "llm_sidecar_upstream_duration_seconds_count",
)
MOCK = "mock/mock-gpt"


def metered_config(mock: MockUpstream, model_dir: Path) -> str:
    # A local provider whose model cannot load: its target is never ready, so its route
    # spills over to the upstream.
    return base_config(mock, extra=f"""
[providers.local]
kind = "local"
engine = "transformers"
model = "{model_dir}"

[models."fallback"]
targets = [ {{ provider = "dead", model = "nothing", weight = 1 }},
            {{ provider = "mock", model = "mock-gpt", fallback_only = true }} ]

[models."spill"]
targets = [ {{ provider = "local", weight = 1 }},
            {{ provider = "mock", model = "mock-gpt", fallback_only = true }} ]

[cache]
enabled = true
""")


@pytest.fixture(scope="module")
def metered(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Sidecar]:
    broken = tmp_path_factory.mktemp("broken-model")
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (broken / name).write_text("not a model")
    instance = start_sidecar(metered_config(mock_upstream, broken),
                             tmp_path_factory.mktemp("metered"))
    yield instance
    instance.stop()


def scrape(sidecar: Sidecar, url: str | None = None, **kwargs: object) -> Samples:
    response = httpx.get(url or sidecar.url + "/metrics", **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


def moved(before: Samples, after: Samples, names: tuple[str, ...] = COUNTED) -> Moved:
    """The samples of these metrics that changed between two scrapes, and by how much."""
    return {(name, tuple(sorted(labels))): value - before.get((name, labels), 0.0)
            for (name, labels), value in after.items()
            if name in names and value != before.get((name, labels), 0.0)}


def sample(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def requests(model: str, status_class: str = "2xx", stream: bool = False,
             operation: str = "chat") -> tuple[str, tuple[tuple[str, str], ...]]:
    return sample("llm_sidecar_requests_total", front_door="openai", operation=operation,
                  model=model, status_class=status_class, stream="true" if stream else "false")


def genai(name: str, target: str, model: str, **labels: str
          ) -> tuple[str, tuple[tuple[str, str], ...]]:
    return sample(name, gen_ai_operation_name="chat", gen_ai_provider_name=target,
                  gen_ai_request_model=model, **labels)


def duration(target: str, model: str, error_type: str = ""
             ) -> tuple[str, tuple[tuple[str, str], ...]]:
    return genai("gen_ai_client_operation_duration_seconds_count", target, model,
                 error_type=error_type)


def served(target: str, model: str) -> Moved:
    """What every request a target answered moves, besides its own kind's counters."""
    return {sample("llm_sidecar_target_selected_total", model=model, target=target): 1,
            sample("llm_sidecar_upstream_duration_seconds_count", target=target): 1}


def chat(sidecar: Sidecar, model: str = "gpt-test", **body: object) -> httpx.Response:
    return httpx.post(sidecar.base_url + "/chat/completions", timeout=30,
                      json={"model": model, "messages": USER, **body})


def test_a_scrape_is_prometheus_text_and_openmetrics_when_asked(metered: Sidecar) -> None:
    plain = httpx.get(metered.url + "/metrics")
    assert plain.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(plain.text)}
    assert {"llm_sidecar_requests", "gen_ai_client_operation_duration_seconds",
            "llm_sidecar_build_info"} <= names
    asked = httpx.get(metered.url + "/metrics",
                      headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert asked.headers["Content-Type"].startswith("application/openmetrics-text")
    assert asked.text.endswith("# EOF\n")
    assert {f.name for f in openmetrics_families(asked.text)} >= {
        "llm_sidecar_requests", "gen_ai_server_time_to_first_token_seconds"}


def test_a_json_answer_moves_its_counters_and_one_observation_each(metered: Sidecar) -> None:
    before = scrape(metered)
    answer = chat(metered)
    assert answer.status_code == 200
    after = scrape(metered)
    assert moved(before, after) == {
        requests("gpt-test"): 1, duration(MOCK, "gpt-test"): 1, **served(MOCK, "gpt-test"),
        sample("llm_sidecar_cache_requests_total", result="bypass"): 1,
        genai("gen_ai_client_token_usage_count", MOCK, "gpt-test",
              gen_ai_token_type="input"): 1,
        genai("gen_ai_client_token_usage_count", MOCK, "gpt-test",
              gen_ai_token_type="output"): 1,
    }
    usage = answer.json()["usage"]
    tokens = moved(before, after, ("gen_ai_client_token_usage_sum",))
    assert tokens == {
        genai("gen_ai_client_token_usage_sum", MOCK, "gpt-test", gen_ai_token_type="input"):
            usage["prompt_tokens"],
        genai("gen_ai_client_token_usage_sum", MOCK, "gpt-test", gen_ai_token_type="output"):
            usage["completion_tokens"]}


def test_a_4xx_counts_under_no_target_and_a_5xx_under_the_target_that_failed(
        metered: Sidecar) -> None:
    before = scrape(metered)
    assert chat(metered, "no-such-model").status_code == 404
    assert chat(metered, "dead").status_code == 502
    after = scrape(metered)
    assert moved(before, after) == {
        requests("other", "4xx"): 1, duration("none", "other", "404"): 1,
        requests("dead", "5xx"): 1, duration("dead/nothing", "dead", "502"): 1,
        **served("dead/nothing", "dead"),
        sample("llm_sidecar_cache_requests_total", result="bypass"): 1,
        # The dead upstream's one retry (providers.dead.max_retries = 1).
        sample("llm_sidecar_retry_budget_spent_total"): 1,
    }


def test_a_stream_counts_as_streamed_with_its_time_to_first_token(metered: Sidecar) -> None:
    delay = 0.25
    before = scrape(metered)
    started = time.perf_counter()
    with httpx.stream("POST", metered.base_url + "/chat/completions", timeout=30, json={
            "model": "gpt-test", "messages": USER, "stream": True,
            "mock": {"delay_s": delay}}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        first_seen = time.perf_counter() - started
        assert "data: [DONE]" in list(lines)
    after = scrape(metered)
    assert moved(before, after) == {
        requests("gpt-test", stream=True): 1, duration(MOCK, "gpt-test"): 1,
        **served(MOCK, "gpt-test"),
        genai("gen_ai_server_time_to_first_token_seconds_count", MOCK, "gpt-test"): 1,
        sample("llm_sidecar_cache_requests_total", result="bypass"): 1,
    }
    [(_, ttft)] = moved(before, after,
                        ("gen_ai_server_time_to_first_token_seconds_sum",)).items()
    # The upstream's wait is in it, and it ends before the client saw the first event.
    assert delay <= ttft <= first_seen


def test_time_to_first_token_is_the_upstreams_wait_within_5_ms(metered: Sidecar) -> None:
    # A loaded machine can only add to what is measured (it never ends before the upstream's
    # first byte), so the best of a few streams shows the measure's own precision.
    delay, extra = 0.2, []
    for _ in range(5):
        before = scrape(metered)
        with httpx.stream("POST", metered.base_url + "/chat/completions", timeout=30, json={
                "model": "gpt-test", "messages": USER, "stream": True,
                "mock": {"delay_s": delay}}) as response:
            assert "data: [DONE]" in list(response.iter_lines())
        [(_, ttft)] = moved(before, scrape(metered),
                            ("gen_ai_server_time_to_first_token_seconds_sum",)).items()
        assert ttft >= delay
        extra.append(ttft - delay)
        if ttft - delay < 0.005:
            break
    assert min(extra) < 0.005, extra


def test_a_stream_with_usage_observes_its_tokens_and_time_per_token(metered: Sidecar) -> None:
    before = scrape(metered)
    with httpx.stream("POST", metered.base_url + "/chat/completions", timeout=30, json={
            "model": "gpt-test", "messages": USER, "stream": True,
            "stream_options": {"include_usage": True},
            "mock": {"chunks": 4, "chunk_delay": 0.05}}) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: {")]
    usage = json.loads(events[-1].removeprefix("data: "))["usage"]
    after = scrape(metered)
    observed = moved(before, after)
    for name, labels in (("gen_ai_client_token_usage_count", {"gen_ai_token_type": "input"}),
                         ("gen_ai_client_token_usage_count", {"gen_ai_token_type": "output"}),
                         ("gen_ai_server_time_per_output_token_seconds_count", {})):
        assert observed[genai(name, MOCK, "gpt-test", **labels)] == 1
    [(_, per_token)] = moved(before, after, (
        "gen_ai_server_time_per_output_token_seconds_sum",)).items()
    # Four chunks 50 ms apart after the first: at least 150 ms over the other tokens.
    assert per_token >= 0.15 / (usage["completion_tokens"] - 1)


def test_a_cache_hit_counts_a_hit_and_no_target(metered: Sidecar) -> None:
    body = {"temperature": 0, "messages": [{"role": "user", "content": "cache me"}]}
    before = scrape(metered)
    first = httpx.post(metered.base_url + "/chat/completions",
                       json={"model": "gpt-test", **body})
    middle = scrape(metered)
    again = httpx.post(metered.base_url + "/chat/completions",
                       json={"model": "gpt-test", **body})
    assert (first.headers["X-Sidecar-Cache"], again.headers["X-Sidecar-Cache"]) == \
        ("miss", "hit")
    after = scrape(metered)
    assert moved(before, middle)[sample("llm_sidecar_cache_requests_total",
                                        result="miss")] == 1
    assert moved(middle, after) == {
        requests("gpt-test"): 1, duration("cache", "gpt-test"): 1,
        sample("llm_sidecar_cache_requests_total", result="hit"): 1,
    }


def test_a_fallback_counts_from_the_failed_target_to_the_one_that_answered(
        metered: Sidecar) -> None:
    before = scrape(metered)
    answer = chat(metered, "fallback")
    assert answer.headers["X-Sidecar-Fallback-From"] == "dead/nothing"
    after = scrape(metered)
    assert moved(before, after) == {
        requests("fallback"): 1, duration(MOCK, "fallback"): 1, **served(MOCK, "fallback"),
        sample("llm_sidecar_fallbacks_total", from_target="dead/nothing", to_target=MOCK): 1,
        # The dead upstream's own retry, then the fallback.
        sample("llm_sidecar_retry_budget_spent_total"): 2,
        sample("llm_sidecar_cache_requests_total", result="bypass"): 1,
        genai("gen_ai_client_token_usage_count", MOCK, "fallback",
              gen_ai_token_type="input"): 1,
        genai("gen_ai_client_token_usage_count", MOCK, "fallback",
              gen_ai_token_type="output"): 1,
    }


def test_a_spill_over_counts_from_the_local_target_and_the_engine_shows_unloaded(
        metered: Sidecar) -> None:
    before = scrape(metered)
    answer = chat(metered, "spill")
    assert answer.headers["X-Sidecar-Spill-Over-From"] == "local/spill"
    after = scrape(metered)
    spills = moved(before, after, ("llm_sidecar_spill_overs_total",
                                   "llm_sidecar_fallbacks_total"))
    assert spills == {sample("llm_sidecar_spill_overs_total", from_target="local/spill",
                             to_target=MOCK): 1}
    loaded = [(dict(labels), value) for (name, labels), value in after.items()
              if name == "llm_sidecar_engine_loaded"]
    assert loaded == [({"provider": "local", "engine": "transformers",
                        "model": loaded[0][0]["model"]}, 0.0)]


def test_a_client_leaving_mid_stream_counts_one_disconnect(metered: Sidecar) -> None:
    before = scrape(metered)
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", metered.base_url + "/chat/completions",
            json={"model": "gpt-test", "messages": USER, "stream": True,
                  "mock": {"chunks": 200, "chunk_delay": 0.02}}) as response:
        assert next(response.iter_lines()).startswith("data: ")
    disconnect = sample("llm_sidecar_client_disconnects_total", model="gpt-test", target=MOCK)
    deadline = time.monotonic() + 10
    while disconnect not in moved(before, after := scrape(metered)):
        assert time.monotonic() < deadline, "the disconnect was never counted"
        time.sleep(0.05)
    changed = moved(before, after)
    assert changed[disconnect] == 1
    # Counted once, under the status the access log gives it (499, or 200 and client_gone).
    assert sum(v for (name, _), v in changed.items()
               if name == "llm_sidecar_requests_total") == 1
    [(_, labels)] = [k for k in changed if k[0] == duration(MOCK, "gpt-test")[0]]
    assert dict(labels)["error_type"] in ("499", "client_gone")


def test_ten_thousand_random_model_names_add_no_series(metered: Sidecar) -> None:
    paths = ["/chat/completions", "/completions", "/embeddings"]

    def body(path: str, model: str) -> dict[str, object]:
        if path == "/embeddings":
            return {"model": model, "input": "x"}
        if path == "/completions":
            return {"model": model, "prompt": "x"}
        return {"model": model, "messages": USER, "stream": random.random() < 0.5}

    async def send(count: int) -> list[int]:
        # aiohttp's client: ten thousand requests in seconds rather than most of a minute.
        connector = aiohttp.TCPConnector(limit=16)
        async with aiohttp.ClientSession(metered.base_url + "/", connector=connector) as client:
            gate = asyncio.Semaphore(16)

            async def one(i: int) -> int:
                path = paths[i % len(paths)]
                name = "".join(random.choices(string.ascii_letters + string.digits, k=24))
                async with gate, client.post(path.lstrip("/"), json=body(path, name)) as reply:
                    await reply.read()
                    return reply.status

            return await asyncio.gather(*(one(i) for i in range(count)))

    assert set(asyncio.run(send(len(paths)))) == {404}  # the `other` series exist now
    before = scrape(metered)
    assert set(asyncio.run(send(10_000))) == {404}
    after = scrape(metered)
    assert set(after) == set(before)
    counted = moved(before, after, ("llm_sidecar_requests_total",))
    assert sum(counted.values()) == 10_000
    assert {dict(labels)["model"] for _, labels in counted} == {"other"}


def exported_names(text: str) -> set[str]:
    """Every series name a scrape can hold, from the families' types (a family with no sample
    yet still declares itself)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",), "info": ("_info",)}
    return {family.name + suffix for family in text_string_to_metric_families(text)
            for suffix in suffixes.get(family.type, ("",))}


def test_every_metric_the_grafana_dashboard_queries_is_exported(metered: Sidecar) -> None:
    dashboard = json.loads((ROOT / "config/grafana/llm-sidecar.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    # Label names (in `by (...)` and `{...}`) share the prefixes: only series names count.
    bare = [re.sub(r"\b(?:by|without)\s*\([^)]*\)|\{[^}]*\}", "", e) for e in queries]
    queried = {name for expr in bare
               for name in re.findall(r"\b(?:gen_ai|llm_sidecar)_[a-z0-9_]+", expr)}
    exported = exported_names(httpx.get(metered.url + "/metrics").text)
    assert queried - exported == set()
    # Rate, errors, time to first token, tokens per second, cache hits, fallbacks, engines.
    assert {"llm_sidecar_requests_total", "gen_ai_client_operation_duration_seconds_count",
            "gen_ai_server_time_to_first_token_seconds_bucket", "gen_ai_client_token_usage_sum",
            "llm_sidecar_cache_requests_total", "llm_sidecar_fallbacks_total",
            "llm_sidecar_engine_queue_depth"} <= queried


def gauge(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_a_target_counts_a_stream_in_flight_until_it_ends(metered: Sidecar) -> None:
    assert gauge(scrape(metered), "llm_sidecar_target_requests_in_flight", target=MOCK) == 0
    with httpx.stream("POST", metered.base_url + "/chat/completions", timeout=30, json={
            "model": "gpt-test", "messages": USER, "stream": True,
            "mock": {"chunks": 3, "chunk_delay": 0.3}}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        during = scrape(metered)
        list(lines)
    assert gauge(during, "llm_sidecar_target_requests_in_flight", target=MOCK) == 1
    assert gauge(scrape(metered), "llm_sidecar_target_requests_in_flight", target=MOCK) == 0


def test_a_target_resting_after_a_429_says_it_is_rate_limited(
        mock_upstream: MockUpstream, tmp_path: Path) -> None:
    sidecar = start_sidecar(base_config(mock_upstream, routing="probe_interval_s = 0"),
                            tmp_path)
    try:
        answer = chat(sidecar, "mock-429", mock={"status": 429, "retry_after": "30"})
        assert answer.status_code == 429
        samples = scrape(sidecar)
    finally:
        sidecar.stop()
    assert gauge(samples, "llm_sidecar_target_resting", target="mock/mock-429",
                 reason="rate_limited") == 1
