"""The app served on loopback for the WebSocket tests, and the messages of one socket turn."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar import config
from sidecar.app import create_app
from tests.support.in_process import serving
from tests.support.sidecar import UPSTREAM_KEY, base_config
from tests.support.upstream_mock import MockUpstream

PATH = "/v1/chat/completions/ws"


def chat(text: str, **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": text}], **fields}


def make_app(upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             server: str = "", extra: str = "") -> web.Application:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    path = tmp_path / "c.toml"
    path.write_text(base_config(upstream, server=server, extra=extra)
                    .replace("@STATE@", str(tmp_path / "r.json")))
    return create_app(config.load(path))


@contextlib.asynccontextmanager
async def opened(app: web.Application) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    async with serving(app) as url, aiohttp.ClientSession() as session:
        yield url, session


async def until_done(socket: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    """The messages of one response, through its `done`, `error` or `cancelled`."""
    messages: list[dict[str, Any]] = []
    while True:
        message: dict[str, Any] = await asyncio.wait_for(socket.receive_json(), 5)
        messages.append(message)
        if message.get("type") in ("done", "error", "cancelled"):
            return messages


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks if c.get("choices"))
