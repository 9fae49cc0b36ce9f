"""Bounds on what others decide for the router: how long an upstream's Retry-After rests a
target, and which weights the admin API, the state file and the fleet may set."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.redis_server import RedisServer
from tests.support.sidecar import Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]
MAX_REST_S = 5
REST_ROUTING = f"failures_before_cooldown = 1000\nprobe_interval_s = 0\nmax_rest_s = {MAX_REST_S}"
PAIR = """
[models."pair"]
targets = [ { provider = "mock", model = "a", weight = 1 },
            { provider = "mock", model = "b", weight = 3 } ]
"""
HUGE = [{"provider": "mock", "model": "a", "weight": 1e308},
        {"provider": "mock", "model": "b", "weight": 1e308}]
SECRET = "fleet-routes-secret-0123456789abcdef"


def post(sidecar: Sidecar, model: str, **body: object) -> httpx.Response:
    return httpx.post(sidecar.base_url + "/chat/completions", timeout=20,
                      json={"model": model, "messages": USER, **body})


def routes(sidecar: Sidecar) -> dict[str, object]:
    response = httpx.get(sidecar.url + "/admin/api/routes", timeout=5)
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


def pair_weights(sidecar: Sidecar) -> list[float]:
    models = routes(sidecar)["models"]
    assert isinstance(models, dict)
    return [target["weight"] for target in models["pair"]]


# -- rests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("asked", [
    {"Retry-After": "1e9"},
    {"Retry-After": "inf"},
    {"Retry-After": "nan"},
    {"Retry-After": "-5"},
    {"Retry-After": "soon, maybe"},
    {"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"},
    {"retry-after-ms": "1e12"},
    {"retry-after-ms": "-inf", "Retry-After": "1" * 400},
], ids=lambda asked: ",".join(f"{k}={v[:12]}" for k, v in asked.items()))
def test_429_retry_after_never_rests_a_target_past_max_rest_s(
        sidecar_factory: Callable[..., Sidecar], upstream: MockUpstream,
        asked: dict[str, str]) -> None:
    sidecar = sidecar_factory(routing=REST_ROUTING)
    limited = post(sidecar, "mock-429", mock={"status": 429, "error_headers": asked})
    assert limited.status_code == 429
    passed_on = limited.headers.get("Retry-After")
    assert passed_on is None or (passed_on.isdigit() and int(passed_on) <= 86_400)
    after = post(sidecar, "mock-429")  # served, or refused for a bounded rest; never a 500
    assert after.status_code in (200, 503), after.text
    if after.status_code == 503:
        assert after.json()["error"]["code"] == "no_healthy_target"
        assert 1 <= int(after.headers["Retry-After"]) <= MAX_REST_S
    health = routes(sidecar)["health"]
    assert isinstance(health, dict)
    assert all(0 <= s <= MAX_REST_S for s in health["resting_targets_s"].values())


# -- weights over the admin API ------------------------------------------------------------


@pytest.fixture(scope="module")
def paired(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Sidecar]:
    """One sidecar for the refused changes: none of them changes anything."""
    instance = start_sidecar(base_config(mock_upstream, extra=PAIR),
                             tmp_path_factory.mktemp("paired"))
    yield instance
    instance.stop()


@pytest.mark.parametrize(("targets", "param"), [
    (HUGE, "targets[0].weight"),
    ([{"provider": "mock", "model": "a", "weight": 1_000_001}], "targets[0].weight"),
    ([{"provider": "mock", "model": "a", "weight": 10**30}], "targets[0].weight"),
    ([{"provider": "mock", "model": "a", "weight": -1}], "targets[0].weight"),
    ([{"provider": "mock", "model": "a", "weight": "5"}], "targets[0].weight"),
    ([{"provider": "mock", "model": "a", "weight": True}], "targets[0].weight"),
    ([{"provider": ["mock"], "model": "a", "weight": 1}], "targets[0].provider"),
    ([{"provider": {"x": 1}, "weight": 1}], "targets[0].provider"),
    ([{"provider": "mock", "model": ["a"], "weight": 1}], "targets[0].model"),
    ([{"provider": "mock", "model": "a", "fallback_only": "yes"}], "targets[0].fallback_only"),
    (["mock"], "targets[0]"),
])
def test_admin_refuses_weights_out_of_bounds_and_wrong_types_with_a_400(
        paired: Sidecar, targets: list[object], param: str) -> None:
    response = httpx.put(paired.url + "/admin/api/routes", timeout=5,
                         json={"model": "pair", "targets": targets})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert pair_weights(paired) == [1.0, 3.0]
    assert post(paired, "pair").status_code == 200


def test_admin_accepts_the_largest_weight(sidecar_factory: Callable[..., Sidecar]) -> None:
    paired = sidecar_factory(extra=PAIR)
    change = [{"provider": "mock", "model": "a", "weight": 1_000_000},
              {"provider": "mock", "model": "b", "weight": 1_000_000}]
    response = httpx.put(paired.url + "/admin/api/routes", timeout=5,
                         json={"model": "pair", "targets": change})
    assert response.status_code == 200
    assert pair_weights(paired) == [1e6, 1e6]
    assert post(paired, "pair").status_code == 200


# -- weights from the state file -----------------------------------------------------------


@pytest.mark.parametrize("saved", [
    {"pair": HUGE},
    {"pair": [{"provider": ["mock"], "weight": 2}]},
    {"pair": [{"provider": "mock", "model": "a", "weight": "2"}]},
    {"pair": "heavy"},
    ["pair"],
], ids=["huge", "unhashable-provider", "string-weight", "not-a-list", "not-an-object"])
def test_a_bad_state_file_is_reported_and_the_toml_weights_stand(
        mock_upstream: MockUpstream, tmp_path: Path, saved: object) -> None:
    (tmp_path / "routes.json").write_text(json.dumps(saved))
    sidecar = start_sidecar(base_config(mock_upstream, extra=PAIR), tmp_path)
    try:
        assert sidecar.wait_for_log("ignor")
        assert pair_weights(sidecar) == [1.0, 3.0]
        assert post(sidecar, "pair").status_code == 200
    finally:
        sidecar.stop()


def test_a_good_entry_of_the_state_file_still_applies(mock_upstream: MockUpstream,
                                                      tmp_path: Path) -> None:
    saved = {"pair": [{"provider": "mock", "model": "a", "weight": 5}],
             "gpt-test": [{"provider": "mock", "weight": 1e308}]}
    (tmp_path / "routes.json").write_text(json.dumps(saved))
    sidecar = start_sidecar(base_config(mock_upstream, extra=PAIR), tmp_path)
    try:
        assert pair_weights(sidecar) == [5.0, 3.0]
        assert sidecar.wait_for_log("saved routes do not fit the config")
    finally:
        sidecar.stop()


# -- weights shared by a fleet -------------------------------------------------------------


def test_shared_weight_change_out_of_bounds_is_ignored(mock_upstream: MockUpstream,
                                                       tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    config = base_config(mock_upstream, extra=PAIR + f"""
[cache]
enabled = true
redis_url = "{redis.url}"
secret_env = "SIDECAR_CACHE_SECRET"
timeout_ms = 100
""")
    sidecar = start_sidecar(config, tmp_path / "one", env={"SIDECAR_CACHE_SECRET": SECRET})
    try:
        # Signed with the fleet's secret, as another sidecar (of another version) would.
        body = json.dumps({"origin": "another", "model": "pair", "targets": HUGE})
        sig = hmac.new(SECRET.encode(), b"routes\0" + body.encode(), hashlib.sha256).hexdigest()
        message = json.dumps({"body": body, "sig": sig})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the sidecar listens
            sent = subprocess.run(["redis-cli", "-p", str(redis.port), "PUBLISH", "sc:routes",
                                   message], check=True, capture_output=True, text=True)
            if sent.stdout.strip() == "1":
                break
            time.sleep(0.05)
        assert sidecar.wait_for_log("shared route change does not fit this config")
        assert pair_weights(sidecar) == [1.0, 3.0]
        assert post(sidecar, "pair").status_code == 200
    finally:
        sidecar.stop()
        redis.stop()
