"""The configuration swap, in this process under blockbuster: reading and checking the new
file, building the new application beside the running one and switching to it never block the
event loop, and the listener's next request reaches the new application."""

from __future__ import annotations

import asyncio
import functools
import gc
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from aiohttp import web

from sidecar import config
from sidecar.app import create_app
from sidecar.live_app import LiveApp
from sidecar.reload import swap_configuration
from sidecar.security.connections import EdgeRunner
from tests.support.in_process import no_blocking
from tests.support.sidecar import UPSTREAM_KEY, base_config
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def listening(mock_upstream: MockUpstream, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[LiveApp, str, Path]]:
    """(the live app, its base URL, its config file) behind the edge runner, as `serve` has."""
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    path = tmp_path / "sidecar.toml"
    path.write_text(base_config(mock_upstream).replace("@STATE@", str(tmp_path / "r.json")))
    live = LiveApp()
    await live.start(create_app(config.load(path)))
    runner = EdgeRunner(live, max_connections=100, max_body_bytes=1 << 20,
                        handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield live, f"http://127.0.0.1:{runner.addresses[0][1]}", path
    finally:
        await runner.cleanup()


async def test_a_swap_never_blocks_the_loop_and_the_next_request_sees_it(
        listening: tuple[LiveApp, str, Path], mock_upstream: MockUpstream) -> None:
    live, url, path = listening
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    try:
        before = live.app
        path.write_text(path.read_text().replace('[models."mock-gpt"]', '[models."renamed"]'))
        with no_blocking():
            outcome = await swap_configuration(live, functools.partial(config.load, path), (),
                                               None)
            assert outcome.applied, outcome.reason
            assert live.app is not before
            reply = await client.chat.completions.create(model="renamed", messages=USER)  # type: ignore[arg-type]
            assert reply.choices[0].message.content == "Hello from mock: hi"
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="mock-gpt", messages=USER)  # type: ignore[arg-type]
        # A broken file: refused, nothing changes, still without blocking.
        path.write_text("[server]\nport = 'eighty'\n")
        with no_blocking():
            refused = await swap_configuration(live, functools.partial(config.load, path), (),
                                               None)
            assert not refused.applied and "`server.port`" in refused.reason
            reply = await client.chat.completions.create(model="renamed", messages=USER)  # type: ignore[arg-type]
            assert reply.choices[0].message.content == "Hello from mock: hi"
    finally:
        await client.close()


async def test_a_retired_application_that_served_requests_is_freed(
        listening: tuple[LiveApp, str, Path]) -> None:
    """aiohttp caches middleware chains by application: the retired one must not stay there."""
    live, url, path = listening
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    try:
        await client.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        served = weakref.ref(live.app)
        outcome = await swap_configuration(live, functools.partial(config.load, path), (), None)
        assert outcome.applied
        await client.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        for _ in range(100):  # the retiring task runs on the loop
            await asyncio.sleep(0.01)
            gc.collect()
            if served() is None:
                break
        assert served() is None
    finally:
        await client.close()
