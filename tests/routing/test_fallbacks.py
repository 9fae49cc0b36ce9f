"""Fallbacks: a drained target (weight 0) is out of the rotation and out of the fallbacks too;
only fallback-only targets serve without a weight."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.sidecar import Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]
MODELS = """
[providers.flat]
kind = "openai"
base_url = "{url}"
max_retries = 0

[models."pair"]
targets = [ {{ provider = "flat", model = "live", weight = 1 }},
            {{ provider = "flat", model = "drained", weight = 1 }} ]

[models."configured"]
targets = [ {{ provider = "flat", model = "live", weight = 1 }},
            {{ provider = "flat", model = "drained", weight = 0 }},
            {{ provider = "flat", model = "backup", weight = 0, fallback_only = true }} ]
"""


@pytest.fixture
def routed(mock_upstream: MockUpstream, tmp_path: Path) -> Iterator[Sidecar]:
    config = base_config(mock_upstream, extra=MODELS.format(url=mock_upstream.base_url))
    instance = start_sidecar(config, tmp_path)
    yield instance
    instance.stop()


def post(sidecar: Sidecar, model: str, **body: object) -> httpx.Response:
    return httpx.post(sidecar.base_url + "/chat/completions", timeout=10,
                      json={"model": model, "messages": USER, **body})


def upstream_models(mock: MockUpstream) -> Counter[str]:
    return Counter(seen.body["model"] for seen in mock.requests)


def test_a_drained_target_is_never_a_fallback(routed: Sidecar, upstream: MockUpstream) -> None:
    drain = {"model": "pair", "targets": [{"provider": "flat", "model": "drained", "weight": 0}]}
    assert httpx.put(routed.url + "/admin/api/routes", json=drain).status_code == 200
    failing = {"status": 500, "only_models": ["live"]}
    for _ in range(5):
        response = post(routed, "pair", mock=failing)
        assert response.status_code >= 500
        assert response.headers.get("x-sidecar-target") != "flat/drained"
    assert upstream_models(upstream) == Counter({"live": 5})


def test_a_target_configured_with_weight_0_is_never_a_fallback_but_a_fallback_only_one_is(
        routed: Sidecar, upstream: MockUpstream) -> None:
    response = post(routed, "configured", mock={"status": 500, "only_models": ["live"]})
    assert response.status_code == 200
    assert response.headers["x-sidecar-target"] == "flat/backup"
    assert upstream_models(upstream) == Counter({"live": 1, "backup": 1})
