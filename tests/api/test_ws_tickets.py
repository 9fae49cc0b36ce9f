"""Browser tickets for the WebSockets (`POST /v1/ws-tickets`), with a real signed token and
aiohttp's WebSocket client offering the ticket as a subprotocol, as a browser page does: a
ticket opens one socket once, within its time, from a listed origin only."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.auth_helpers import Issuer, jwt_config, make_issuer
from tests.support.upstream_mock import MockUpstream
from tests.support.websockets import PATH, chat, make_app, opened, until_done

PAGE = "https://chat.example.com"


def ticket_app(upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               ttl_s: float = 30) -> tuple[Any, Issuer]:
    issuer = make_issuer(tmp_path)
    app = make_app(upstream, tmp_path, monkeypatch,
                   server=f'ws_allowed_origins = ["{PAGE}"]\nws_ticket_ttl_s = {ttl_s}',
                   extra=jwt_config(f'public_key_file = "{issuer.public_path}"'))
    return app, issuer


async def ticket(session: aiohttp.ClientSession, url: str, issuer: Issuer) -> dict[str, Any]:
    reply = await session.post(url + "/v1/ws-tickets",
                               headers={"Authorization": f"Bearer {issuer.token()}"})
    assert reply.status == 200
    assert reply.headers["Cache-Control"] == "no-store"
    body: dict[str, Any] = await reply.json()
    return body


async def test_a_ticket_opens_one_socket_from_the_page_as_the_token_would(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app, issuer = ticket_app(upstream, tmp_path, monkeypatch)
    async with opened(app) as (url, session):
        given = await ticket(session, url, issuer)
        assert given["protocols"] == ["llm-sidecar", "ticket." + given["ticket"]]
        async with session.ws_connect(url + PATH, origin=PAGE,
                                      protocols=given["protocols"]) as socket:
            assert socket.protocol == "llm-sidecar"  # a browser needs one of its own chosen
            await socket.send_json(chat("from a browser"))
            assert (await until_done(socket))[-1]["type"] == "done"
        # Used once: the same ticket opens nothing more.
        with pytest.raises(aiohttp.WSServerHandshakeError) as reused:
            await session.ws_connect(url + PATH, origin=PAGE, protocols=given["protocols"])
        assert reused.value.status == 401


async def test_without_a_ticket_or_token_the_upgrade_is_refused(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app, _ = ticket_app(upstream, tmp_path, monkeypatch)
    async with opened(app) as (url, session):
        for protocols in ((), ("llm-sidecar",), ("llm-sidecar", "ticket.made-up")):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url + PATH, origin=PAGE, protocols=protocols)
            assert refused.value.status == 401
        # Nor is a ticket handed out without a token.
        reply = await session.post(url + "/v1/ws-tickets")
        assert reply.status == 401
        assert (await reply.json())["error"]["code"] == "missing_token"


async def test_an_expired_ticket_is_refused(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app, issuer = ticket_app(upstream, tmp_path, monkeypatch, ttl_s=0.2)
    async with opened(app) as (url, session):
        given = await ticket(session, url, issuer)
        await asyncio.sleep(0.4)  # the ticket's lifetime is the behaviour under test
        reply = await session.get(url + PATH, headers={
            "Origin": PAGE, "Connection": "Upgrade", "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol": ", ".join(given["protocols"])})
        assert reply.status == 401
        error = (await reply.json())["error"]
        assert error["code"] == "invalid_ticket"
        assert "expired" in error["message"]


async def test_a_ticket_from_another_origin_is_refused_and_not_spent(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app, issuer = ticket_app(upstream, tmp_path, monkeypatch)
    async with opened(app) as (url, session):
        given = await ticket(session, url, issuer)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url + PATH, origin="https://evil.example.net",
                                     protocols=given["protocols"])
        assert refused.value.status == 403
        async with session.ws_connect(url + PATH, origin=PAGE,
                                      protocols=given["protocols"]) as socket:
            await socket.send_json(chat("still mine"))
            assert (await until_done(socket))[-1]["type"] == "done"
