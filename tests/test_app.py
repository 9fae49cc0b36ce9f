"""The application's background parts, seen from outside: the probe that takes an upstream out
of rotation and brings it back says so in the log, once each way."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from aiohttp import web

from tests.support.loopback import ThreadedServer
from tests.support.sidecar import Sidecar, start_sidecar


class Flaky:
    """An OpenAI-compatible upstream whose model list fails until it is told to recover."""

    def __init__(self) -> None:
        self.healthy = False
        self.server = ThreadedServer()

    async def models(self, request: web.Request) -> web.Response:
        if not self.healthy:
            return web.json_response({"error": {"message": "down"}}, status=503)
        return web.json_response({"object": "list", "data": []})

    def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        self.server.start(app)


@pytest.fixture
def flaky() -> Iterator[Flaky]:
    upstream = Flaky()
    upstream.start()
    yield upstream
    upstream.server.stop()


def probed(flaky: Flaky, workdir: object) -> Sidecar:
    return start_sidecar(f"""
[server]
host = "127.0.0.1"
port = 0

[providers.flaky]
kind = "openai"
base_url = "http://127.0.0.1:{flaky.server.port}/v1"

[models."m"]
targets = [ {{ provider = "flaky" }} ]

[routing]
state_file = "@STATE@"
probe_interval_s = 0.1
""", workdir)  # type: ignore[arg-type]


def test_the_probe_logs_an_upstream_leaving_and_rejoining_rotation_once_each(
        flaky: Flaky, tmp_path: object) -> None:
    sidecar = probed(flaky, tmp_path)
    try:
        assert sidecar.wait_for_log("provider out of rotation", timeout=5)
        time.sleep(0.5)  # several more probes fail: still one line
        assert sidecar.logs().count("provider out of rotation") == 1
        flaky.healthy = True
        assert sidecar.wait_for_log("provider back in rotation", timeout=5)
        time.sleep(0.5)
        assert sidecar.logs().count("provider back in rotation") == 1
        assert '"provider":"flaky"' in sidecar.logs()
    finally:
        sidecar.stop()
