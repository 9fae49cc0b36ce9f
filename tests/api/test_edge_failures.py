"""The edge when a handler fails after its response began (the app in this process, on
loopback): no second response is written into the first, and the request is still counted."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.support.upstream_mock import MockUpstream
from tests.support.websockets import make_app, opened


async def _broken(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"partial")
    raise RuntimeError("a fault of ours after the first byte")


async def test_a_fault_after_the_response_began_closes_it_and_is_counted(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(upstream, tmp_path, monkeypatch)
    app.router.add_get("/v1/broken", _broken)
    async with opened(app) as (url, session):
        async with session.get(url + "/v1/broken") as reply:
            assert reply.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await reply.read()  # cut, never a "HTTP/1.1 500" inside the body
        async with session.get(url + "/metrics") as scrape:
            text = await scrape.text()
    counted = {tuple(sorted(s.labels.items())): s.value
               for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == "llm_sidecar_requests_total"}
    assert counted.get((("front_door", "openai"), ("model", ""), ("operation", "other"),
                        ("status_class", "5xx"), ("stream", "false"))) == 1
