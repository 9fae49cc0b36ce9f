"""Routing: weights honoured, live changes, cooldowns, fallback before the first byte only,
a retry budget, and changes that survive a restart."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from sidecar.routing.table import Route, Target
from tests.support.auth_helpers import Issuer, jwt_config, make_issuer
from tests.support.sidecar import ROOT, Sidecar, base_config, closed_port, start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]


def routing_config(mock: MockUpstream, routing: str = "", extra: str = "") -> str:
    models = f"""
[providers.flat]
kind = "openai"
base_url = "{mock.base_url}"
max_retries = 0

[providers.gone]
kind = "openai"
base_url = "http://127.0.0.1:{closed_port()}/v1"
max_retries = 0

[providers.gone2]
kind = "openai"
base_url = "http://127.0.0.1:{closed_port()}/v1"
max_retries = 0

[models."split"]
targets = [ {{ provider = "flat", model = "a", weight = 1 }},
            {{ provider = "flat", model = "b", weight = 1 }} ]

[models."fb"]
targets = [ {{ provider = "flat", model = "primary", weight = 1 }},
            {{ provider = "flat", model = "backup", weight = 1, fallback_only = true }} ]

[models."solo"]
targets = [ {{ provider = "flat", model = "solo" }} ]

[models."alldead"]
targets = [ {{ provider = "gone", model = "x", weight = 2 }},
            {{ provider = "gone2", model = "y", weight = 1 }} ]
{extra}
"""
    settings = routing or "failures_before_cooldown = 3\ncooldown_s = 1\nprobe_interval_s = 0"
    return base_config(mock, routing=settings, extra=models)


@pytest.fixture
def routed(mock_upstream: MockUpstream, tmp_path: Path) -> Iterator[Sidecar]:
    instance = start_sidecar(routing_config(mock_upstream), tmp_path)
    yield instance
    instance.stop()


def post(sidecar: Sidecar, model: str, timeout: float = 10, **body: object) -> httpx.Response:
    return httpx.post(sidecar.base_url + "/chat/completions", timeout=timeout,
                      json={"model": model, "messages": USER, **body})


def upstream_models(mock: MockUpstream) -> Counter[str]:
    return Counter(seen.body["model"] for seen in mock.requests)


def test_weights_are_honoured_chi_square() -> None:
    targets = [Target("p", "a", 3), Target("p", "b", 1), Target("p", "c", 1),
               Target("p", "d", 0), Target("p", "e", 5, fallback_only=True)]
    route = Route("m", targets, rng=random.Random(1234))
    counts = Counter(route.choose().model for _ in range(10_000))  # type: ignore[union-attr]
    assert set(counts) == {"a", "b", "c"}  # weight 0 and fallback-only are out of rotation
    expected = {"a": 6000, "b": 2000, "c": 2000}
    chi_square = sum((counts[k] - e) ** 2 / e for k, e in expected.items())
    assert chi_square < 13.82  # df = 2, p = 0.001


def test_weight_change_over_the_admin_api_moves_the_next_requests(
        routed: Sidecar, upstream: MockUpstream) -> None:
    for _ in range(60):
        assert post(routed, "split").status_code == 200
    before = upstream_models(upstream)
    assert before["a"] > 10 and before["b"] > 10
    change = httpx.put(routed.url + "/admin/api/routes", json={
        "model": "split", "targets": [{"provider": "flat", "model": "a", "weight": 0},
                                      {"provider": "flat", "model": "b", "weight": 2}]})
    assert change.status_code == 200, change.text
    assert [t["weight"] for t in change.json()["targets"]] == [0, 2]
    upstream.reset()
    for _ in range(40):
        response = post(routed, "split")
        assert response.headers["x-sidecar-target"] == "flat/b"
    assert upstream_models(upstream) == Counter({"b": 40})
    shown = httpx.get(routed.url + "/admin/api/routes").json()
    assert shown["models"]["split"][0]["weight"] == 0
    assert routed.wait_for_log('"msg":"routes changed"') and '"before":' in routed.logs()


def test_a_target_that_resets_connections_rests_and_comes_back(
        routed: Sidecar, upstream: MockUpstream) -> None:
    for _ in range(3):
        assert post(routed, "solo", mock={"disconnect": True}).status_code == 502
    started = time.monotonic()
    resting = post(routed, "solo")
    assert resting.status_code == 503
    assert time.monotonic() - started < 0.5
    assert resting.json()["error"]["code"] == "no_healthy_target"
    assert "flat/solo: upstream_unreachable" in resting.json()["error"]["message"]
    assert upstream.count() == 3  # the resting target was not asked
    time.sleep(1.1)
    assert post(routed, "solo").status_code == 200


def test_429_retry_after_rests_that_target_that_long(routed: Sidecar,
                                                    upstream: MockUpstream) -> None:
    refused = post(routed, "solo", mock={"status": 429, "retry_after": 2})
    assert refused.status_code == 429
    resting = post(routed, "solo")
    assert resting.status_code == 503
    assert resting.headers["Retry-After"] in ("1", "2")
    time.sleep(1.0)
    assert post(routed, "solo").status_code == 503
    time.sleep(1.2)
    assert post(routed, "solo").status_code == 200


def test_fallback_before_the_first_byte(routed: Sidecar, upstream: MockUpstream) -> None:
    failing = {"status": 500, "only_models": ["primary"]}
    response = post(routed, "fb", mock=failing)
    assert response.status_code == 200
    assert response.headers["x-sidecar-target"] == "flat/backup"
    assert response.headers["x-sidecar-fallback-from"] == "flat/primary"
    with httpx.stream("POST", routed.base_url + "/chat/completions", json={
            "model": "fb", "messages": USER, "stream": True, "mock": failing}) as stream:
        assert stream.headers["x-sidecar-target"] == "flat/backup"
        assert b"".join(stream.iter_raw()).endswith(b"data: [DONE]\n\n")
    assert upstream_models(upstream) == Counter({"primary": 2, "backup": 2})


def test_no_fallback_after_the_first_byte(routed: Sidecar, upstream: MockUpstream) -> None:
    with httpx.stream("POST", routed.base_url + "/chat/completions", json={
            "model": "fb", "messages": USER, "stream": True,
            "mock": {"chunks": 6, "reset_after": 2, "only_models": ["primary"]}}) as stream:
        raw = b"".join(stream.iter_raw())
    assert b'"error"' in raw and b"[DONE]" not in raw
    assert upstream_models(upstream) == Counter({"primary": 1})


def test_a_bad_request_is_not_retried_elsewhere(routed: Sidecar, upstream: MockUpstream) -> None:
    response = post(routed, "fb", mock={"status": 400, "only_models": ["primary"]})
    assert response.status_code == 400
    assert upstream_models(upstream) == Counter({"primary": 1})


def test_every_target_down_is_a_fast_503(routed: Sidecar) -> None:
    assert post(routed, "alldead").status_code == 502  # tried both, both unreachable
    for _ in range(2):
        post(routed, "alldead")
    started = time.monotonic()
    response = post(routed, "alldead")
    assert response.status_code == 503
    assert time.monotonic() - started < 0.5
    assert int(response.headers["Retry-After"]) >= 1


def test_probes_take_an_unreachable_upstream_out(mock_upstream: MockUpstream,
                                                 tmp_path: Path) -> None:
    config = routing_config(mock_upstream, routing="probe_interval_s = 0.2")
    sidecar = start_sidecar(config, tmp_path)
    try:
        time.sleep(0.6)
        response = post(sidecar, "alldead")
        assert response.status_code == 503
        assert "unreachable by probe" in response.json()["error"]["message"]
        assert post(sidecar, "solo").status_code == 200  # the live upstream stays in
    finally:
        sidecar.stop()


def test_retry_budget_caps_amplification(mock_upstream: MockUpstream, tmp_path: Path,
                                         upstream: MockUpstream) -> None:
    extra = """
[providers.eager]
kind = "openai"
base_url = "MOCK"
max_retries = 2
max_retry_wait_s = 0.01

[models."amplify"]
targets = [ { provider = "eager", model = "one", weight = 1 },
            { provider = "eager", model = "two", weight = 1 } ]
""".replace("MOCK", mock_upstream.base_url)
    config = routing_config(mock_upstream, extra=extra, routing=(
        "failures_before_cooldown = 1000\nretry_budget_ratio = 0.2\nprobe_interval_s = 0"))
    sidecar = start_sidecar(config, tmp_path)
    try:
        with httpx.Client() as client:
            for _ in range(100):
                response = client.post(sidecar.base_url + "/chat/completions", json={
                    "model": "amplify", "messages": USER,
                    "mock": {"status": 500, "retry_after": 0}})
                assert response.status_code == 502
        budget = httpx.get(sidecar.url + "/admin/api/routes").json()["health"]["retry_budget"]
        assert budget["refused"] > 0  # the budget, not the retry settings, stopped the rest
        assert budget["spent"] <= 10 + 0.2 * 100 + 1
    finally:
        sidecar.stop()
    # Unbounded, each request would cost 3 tries on each of 2 targets: 600 upstream requests.
    assert upstream.count() <= 100 + 10 + 0.2 * 100 + 1


def test_invalid_changes_are_refused_and_change_nothing(routed: Sidecar) -> None:
    before = httpx.get(routed.url + "/admin/api/routes").json()["models"]
    bad = [
        {"model": "split", "targets": [{"provider": "nope", "weight": 1}]},
        {"model": "split", "targets": [{"provider": "flat", "model": "a", "weight": -1}]},
        {"model": "split", "targets": [{"provider": "flat", "model": "a", "weight": 0},
                                       {"provider": "flat", "model": "b", "weight": 0}]},
        {"model": "split", "targets": [{"provider": "flat", "weight": 3}]},  # two match
        {"model": "unknown", "targets": [{"provider": "flat", "weight": 1}]},
        {"model": "split", "targets": []},
        {"model": "split", "targets": [{"provider": "flat", "model": "a", "weight": "x"}]},
        {"model": "split", "targets": [{"provider": "flat", "model": "a", "colour": "red"}]},
    ]
    for body in bad:
        response = httpx.put(routed.url + "/admin/api/routes", json=body)
        assert response.status_code == 400, body
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.put(routed.url + "/admin/api/routes", content=b"{",
                     headers={"Content-Type": "application/json"}).status_code == 400
    assert httpx.get(routed.url + "/admin/api/routes").json()["models"] == before
    assert not (Path(routed.log_path).parent / "routes.json").exists()


def test_a_change_survives_a_restart(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    config = routing_config(mock_upstream)
    first = start_sidecar(config, tmp_path)
    try:
        assert httpx.put(first.url + "/admin/api/routes", json={
            "model": "split", "targets": [{"provider": "flat", "model": "a", "weight": 7,
                                           "fallback_only": True}]}).status_code == 200
    finally:
        first.stop()
    config_text = (tmp_path / "sidecar.toml").read_text()
    assert "weight = 7" not in config_text  # the operator's file is not rewritten
    second = start_sidecar(config, tmp_path)
    try:
        split = httpx.get(second.url + "/admin/api/routes").json()["models"]["split"]
        assert split[0] == {"provider": "flat", "model": "a", "weight": 7.0,
                            "fallback_only": True}
    finally:
        second.stop()


def test_routes_cli_shows_and_sets(routed: Sidecar) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sidecar", "routes", *args,
                               "--url", routed.url], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)

    shown = cli("show")
    assert shown.returncode == 0, shown.stderr
    assert "flat/a  weight 1" in shown.stdout
    changed = cli("set", "split", "flat/a=4", "--fallback-only", "flat/b")
    assert changed.returncode == 0, changed.stderr
    assert "flat/a  weight 4" in changed.stdout
    assert "flat/b  weight 1  (fallback only)" in changed.stdout
    refused = cli("set", "split", "nope=1")
    assert refused.returncode == 1
    assert "unknown provider" in refused.stderr


@pytest.fixture(scope="module")
def admin_issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return make_issuer(tmp_path_factory.mktemp("admin-issuer"))


def test_admin_api_needs_the_admin_scope(mock_upstream: MockUpstream, admin_issuer: Issuer,
                                         tmp_path: Path) -> None:
    config = routing_config(mock_upstream) + jwt_config(
        f'public_key_file = "{admin_issuer.public_path}"')
    sidecar = start_sidecar(config, tmp_path)
    get: Callable[[str | None], int] = lambda token: httpx.get(  # noqa: E731
        sidecar.url + "/admin/api/routes",
        headers={"Authorization": f"Bearer {token}"} if token else {}).status_code
    try:
        assert get(None) == 401
        assert get(admin_issuer.token(scope="sidecar:chat")) == 403
        admin = admin_issuer.token(sub="operator", scope="sidecar:admin")
        assert get(admin) == 200
        change = httpx.put(sidecar.url + "/admin/api/routes",
                           headers={"Authorization": f"Bearer {admin}"},
                           json={"model": "split", "targets": [{"provider": "flat",
                                                                "model": "a", "weight": 2}]})
        assert change.status_code == 200
        assert sidecar.wait_for_log('"who":"operator"')
    finally:
        sidecar.stop()
