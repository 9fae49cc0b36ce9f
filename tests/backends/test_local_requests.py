"""The local backend's side of a request: what it refuses that an upstream would take, and how
a request that waits for the model to load is logged."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.backends.test_local import QUESTION, local_config, wait_ready
from tests.support.sidecar import Sidecar, start_sidecar
from tests.support.upstream_mock import MockUpstream


@pytest.fixture(scope="module")
def loading(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Sidecar]:
    """A sidecar whose model is still loading when it starts listening."""
    instance = start_sidecar(local_config(mock_upstream), tmp_path_factory.mktemp("loading"))
    yield instance
    instance.stop()


def test_waiting_for_the_model_is_logged_as_its_own_duration_not_overhead(
        loading: Sidecar) -> None:
    if httpx.get(loading.url + "/readyz").status_code == 200:
        pytest.skip("the model loaded before the first request could wait for it")
    reply = httpx.post(loading.base_url + "/chat/completions", timeout=120, json={
        "model": "local", "messages": QUESTION, "temperature": 0, "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    request_id = reply.headers["x-request-id"]
    assert loading.wait_for_log(request_id)
    line = next(json.loads(text) for text in loading.logs().splitlines()
                if request_id in text and '"sidecar.access"' in text)
    assert line["model_wait_us"] > 50_000  # it waited for the load
    # What the sidecar itself spent stays small, however long the load took.
    assert line["overhead_us"] < line["model_wait_us"]
    assert line["overhead_us"] < 50_000
    assert float(reply.headers["x-sidecar-overhead-ms"]) < 50


@pytest.mark.parametrize(("field", "value"), [("temperature", 5), ("presence_penalty", 3),
                                              ("frequency_penalty", -2.5)])
def test_a_value_a_local_model_cannot_take_is_a_400_naming_it(
        loading: Sidecar, field: str, value: float) -> None:
    wait_ready(loading)
    with pytest.raises(openai.BadRequestError) as caught:
        loading.client().chat.completions.create(
            model="local", messages=QUESTION, max_tokens=2,  # type: ignore[arg-type]
            **{field: value})
    assert caught.value.param == field
