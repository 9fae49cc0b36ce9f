"""docs/architecture.md says a front door is one module plus its registration, and shows one.
That module, taken from the page as it is, is registered here and answers through the path:
routed, logged and recorded like any OpenAI request."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import httpx
import pytest

from sidecar import config
from sidecar.app import create_app
from tests.support.in_process import serving
from tests.support.sidecar import ROOT, UPSTREAM_KEY, base_config
from tests.support.upstream_mock import MockUpstream


def example_module(tmp_path: Path) -> object:
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = page.split("## Adding a front door", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the page no longer shows the module"
    path = tmp_path / "echo_front_door.py"
    path.write_text(code[1], encoding="utf-8")
    spec = importlib.util.spec_from_file_location("echo_front_door", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["echo_front_door"] = module
    spec.loader.exec_module(module)
    return module


async def test_the_front_door_shown_in_the_architecture_page_works(
        mock_upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    mock_upstream.reset()
    echo = example_module(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(base_config(mock_upstream).replace("@STATE@", str(tmp_path / "r.json")))
    app = create_app(config.load(path))
    app.add_routes(echo.routes)  # type: ignore[attr-defined]  # the registration
    async with serving(app) as url, httpx.AsyncClient() as client:
        reply = await client.post(url + "/v1/echo", json={"model": "gpt-test", "text": "hi"})
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"text": "Hello from mock: hi"}
        # Through the path: the route's target was reached, with its model name.
        assert mock_upstream.count() == 1
        refused = await client.post(url + "/v1/echo", json={"model": "nope", "text": "x"})
        assert refused.status_code == 404  # the path's errors, in the OpenAI shape
        assert refused.json()["error"]["code"] == "model_not_found"
