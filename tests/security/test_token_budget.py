"""Token budgets and the requests that no target served: what they reserved comes back."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support.sidecar import base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]


def chat(url: str, model: str, max_tokens: int) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=30,
                      json={"model": model, "messages": USER, "max_tokens": max_tokens})


def test_a_request_no_target_served_gives_back_its_reservation(mock_upstream: MockUpstream,
                                                              tmp_path: Path) -> None:
    sidecar = start_sidecar(
        base_config(mock_upstream, extra="[limits]\ntokens_per_minute = 400\n"), tmp_path)
    try:
        # About 320 tokens reserved (the prompt estimate and max_tokens); the only target is
        # unreachable, so nothing was used.
        failed = chat(sidecar.url, "dead", 300)
        assert failed.status_code in (502, 503), failed.text
        # The whole reservation again fits only if the failed one came back.
        assert chat(sidecar.url, "gpt-test", 300).status_code == 200
    finally:
        sidecar.stop()
