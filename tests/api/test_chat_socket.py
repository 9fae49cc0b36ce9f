"""Chat completions over a WebSocket, with aiohttp's WebSocket client against the app served on
loopback and the mock OpenAI upstream: the chunks an SSE stream carries, `done` with usage,
errors, one response in flight, cancel, the Origin allow-list, the token on the upgrade, the
size and rate limits, and the drain's close code 1001."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import WSMsgType

from sidecar.api import chat_socket
from sidecar.appkeys import SOCKETS
from sidecar.protocol import requests
from tests.support.auth_helpers import jwt_config, make_issuer
from tests.support.in_process import no_blocking
from tests.support.scripted_upstream import ScriptedUpstream, chat_chunk
from tests.support.sidecar import base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream
from tests.support.websockets import PATH, chat, make_app, opened, text_of, until_done


async def test_a_turn_carries_the_sse_streams_chunks_then_done_with_usage(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(upstream, tmp_path, monkeypatch)
    async with opened(app) as (url, session):
        async with session.ws_connect(url + PATH) as socket:
            with no_blocking():
                await socket.send_json(chat("hello over a socket", mock={"chunks": 4}))
                messages = await until_done(socket)
            # The same socket serves the next turn.
            await socket.send_json(chat("second turn"))
            second = await until_done(socket)
        sse = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        stream = await sse.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello over a socket"}],
            stream=True, stream_options={"include_usage": True},
            extra_body={"mock": {"chunks": 4}})
        sse_chunks = [chunk.model_dump(exclude_none=True) async for chunk in stream]
        await sse.close()
    chunks, done = messages[:-1], messages[-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len(chunks) >= 4
    assert text_of(chunks) == text_of(sse_chunks) == "t0 t1 t2 t3 "
    assert done["type"] == "done"
    assert done["usage"] == sse_chunks[-1]["usage"]
    assert done["usage"]["total_tokens"] > 0
    # The usage chunk itself only comes when the client asked for it, as over SSE.
    assert not any(c.get("usage") for c in chunks)
    assert text_of(second[:-1]) == "Hello from mock: second turn"
    assert second[-1]["type"] == "done"
    # Each turn went upstream as a stream asking for usage, with the route's model.
    sent = [seen.body for seen in upstream.requests]
    assert [b["model"] for b in sent] == ["mock-gpt"] * 3
    assert all(b["stream"] is True and b["stream_options"] == {"include_usage": True}
               for b in sent)


async def test_errors_come_as_error_messages_in_the_openai_shape_and_the_socket_stays(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(upstream, tmp_path, monkeypatch)
    async with opened(app) as (url, session), session.ws_connect(url + PATH) as socket:
        await socket.send_json({"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        unknown = await until_done(socket)
        await socket.send_str("{not json")
        broken = await until_done(socket)
        await socket.send_json({"type": "launch"})
        odd = await until_done(socket)
        await socket.send_json({"model": "gpt-test", "messages": "not a list"})
        invalid = await until_done(socket)
        await socket.send_json(chat("still here"))
        fine = await until_done(socket)
    assert unknown == [{"type": "error", "error": {
        "message": unknown[0]["error"]["message"], "type": "invalid_request_error",
        "param": "model", "code": "model_not_found"}}]
    for refused in (broken, odd, invalid):
        assert refused[0]["type"] == "error"
        assert refused[0]["error"]["type"] == "invalid_request_error"
        assert refused[0]["error"]["message"]
    assert odd[0]["error"]["param"] == "type"
    assert fine[-1]["type"] == "done"
    assert text_of(fine[:-1]) == "Hello from mock: still here"


async def test_a_fault_of_ours_is_an_error_message_and_the_socket_stays(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A turn that raised anything but the sidecar's own errors (a translation's TypeError on a
    # hostile body, once) got no answer at all: the client waited forever.
    app = make_app(upstream, tmp_path, monkeypatch)
    faults = [TypeError("'int' object is not iterable")]

    def validate(payload: Any, schema: Any) -> Any:
        if faults:
            raise faults.pop()
        return requests.validate(payload, schema)

    monkeypatch.setattr(chat_socket, "validate", validate)
    async with opened(app) as (url, session), session.ws_connect(url + PATH) as socket:
        await socket.send_json(chat("first"))
        failed = await until_done(socket)
        await socket.send_json(chat("second"))
        fine = await until_done(socket)
    assert failed == [{"type": "error", "error": {
        "message": failed[0]["error"]["message"], "type": "server_error", "param": None,
        "code": None}}]
    assert "failed to handle" in failed[0]["error"]["message"]
    assert fine[-1]["type"] == "done"


async def test_one_response_in_flight_and_cancel_aborts_the_upstream_request(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(upstream, tmp_path, monkeypatch)
    async with opened(app) as (url, session), session.ws_connect(url + PATH) as socket:
        await socket.send_json(chat("a long answer to cancel", mock={
            "chunks": 5, "chunk_delay": 1.0, "key": "cancel-me"}))
        first = await asyncio.wait_for(socket.receive_json(), 5)
        assert first["object"] == "chat.completion.chunk"
        await socket.send_json(chat("meanwhile"))
        refused = await asyncio.wait_for(socket.receive_json(), 5)
        assert refused["type"] == "error"
        assert refused["error"]["code"] == "request_already_in_flight"
        await socket.send_json({"type": "cancel"})
        rest = await until_done(socket)
        assert rest[-1] == {"type": "cancelled"}
        assert await asyncio.to_thread(upstream.aborted_event.wait, 5)
        assert "cancel-me" in upstream.aborted
        # The socket takes the next response.
        await socket.send_json(chat("after the cancel"))
        after = await until_done(socket)
    assert after[-1]["type"] == "done"
    assert len(upstream.requests) == 2  # the refused turn never went upstream


async def test_a_client_that_leaves_cancels_the_upstream_request(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(upstream, tmp_path, monkeypatch)
    async with opened(app) as (url, session):
        async with session.ws_connect(url + PATH) as socket:
            await socket.send_json(chat("leaving", mock={
                "chunks": 5, "chunk_delay": 1.0, "key": "left"}))
            await asyncio.wait_for(socket.receive_json(), 5)
        assert await asyncio.to_thread(upstream.aborted_event.wait, 5)
    assert upstream.aborted == ["left"]


async def test_a_browser_origin_not_listed_is_refused_on_the_upgrade(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(upstream, tmp_path, monkeypatch,
                   server='ws_allowed_origins = ["https://chat.example.com"]')
    async with opened(app) as (url, session):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url + PATH, origin="https://evil.example.net")
        assert refused.value.status == 403
        reply = await session.get(url + PATH, headers={
            "Origin": "https://evil.example.net", "Connection": "Upgrade",
            "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        body = await reply.json()
        assert reply.status == 403
        assert body["error"]["code"] == "origin_not_allowed"
        async with session.ws_connect(url + PATH, origin="https://chat.example.com") as socket:
            await socket.send_json(chat("from the listed page"))
            assert (await until_done(socket))[-1]["type"] == "done"


async def test_the_upgrade_needs_a_valid_token_when_auth_is_on(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    issuer = make_issuer(tmp_path)
    app = make_app(upstream, tmp_path, monkeypatch,
                   extra=jwt_config(f'public_key_file = "{issuer.public_path}"'))
    async with opened(app) as (url, session):
        for headers, status in (({}, 401), ({"Authorization": "Bearer not.a.token"}, 401),
                                ({"Authorization": f"Bearer {issuer.token(scope='other')}"},
                                 403)):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url + PATH, headers=headers)
            assert refused.value.status == status
        good = {"Authorization": f"Bearer {issuer.token()}"}
        async with session.ws_connect(url + PATH, headers=good) as socket:
            await socket.send_json(chat("signed"))
            assert (await until_done(socket))[-1]["type"] == "done"


async def test_an_oversize_message_closes_the_socket_with_1009(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(upstream, tmp_path, monkeypatch, server="ws_max_message_bytes = 2048")
    async with opened(app) as (url, session), session.ws_connect(url + PATH) as socket:
        await socket.send_json(chat("x" * 4096))
        message = await asyncio.wait_for(socket.receive(), 5)
        while message.type not in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
            message = await asyncio.wait_for(socket.receive(), 5)
        assert socket.close_code == 1009
    assert upstream.requests == []


async def test_too_many_messages_a_minute_close_the_socket_with_1008(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(upstream, tmp_path, monkeypatch, server="ws_messages_per_minute = 3")
    async with opened(app) as (url, session), session.ws_connect(url + PATH) as socket:
        for _ in range(4):
            await socket.send_json({"type": "cancel"})  # nothing in flight: no answer
        refused = await asyncio.wait_for(socket.receive_json(), 5)
        assert refused["error"]["code"] == "rate_limit_exceeded"
        closing = await asyncio.wait_for(socket.receive(), 5)
        assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
        assert socket.close_code == 1008


async def test_the_drain_closes_idle_sockets_at_once_and_busy_ones_after_their_response(
        upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(upstream, tmp_path, monkeypatch)
    async with opened(app) as (url, session), session.ws_connect(url + PATH) as idle, \
            session.ws_connect(url + PATH) as busy:
        await busy.send_json(chat("finish me", mock={"chunks": 3, "chunk_delay": 0.3}))
        assert (await asyncio.wait_for(busy.receive_json(), 5))["object"] == \
            "chat.completion.chunk"
        assert len(app[SOCKETS]) == 2
        app[SOCKETS].drain()  # what a stopping server does first
        closing = await asyncio.wait_for(idle.receive(), 5)
        assert (closing.type, closing.data) == (WSMsgType.CLOSE, 1001)
        rest = await until_done(busy)
        assert rest[-1]["type"] == "done"
        assert text_of([m for m in rest if "choices" in m]).endswith("t2 ")
        closing = await asyncio.wait_for(busy.receive(), 5)
        assert (closing.type, closing.data) == (WSMsgType.CLOSE, 1001)


async def test_sigterm_closes_sockets_with_1001_after_the_response_in_flight(
        upstream: MockUpstream, tmp_path: Path) -> None:
    sidecar = start_sidecar(base_config(upstream), tmp_path)
    try:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(sidecar.url + PATH) as idle, \
                session.ws_connect(sidecar.url + PATH) as busy:
            await busy.send_json(chat("finish me", mock={"chunks": 4, "chunk_delay": 0.3}))
            await asyncio.wait_for(busy.receive_json(), 5)
            sidecar.process.send_signal(signal.SIGTERM)
            closing = await asyncio.wait_for(idle.receive(), 5)
            assert (closing.type, closing.data) == (WSMsgType.CLOSE, 1001)
            rest = await until_done(busy)
            assert rest[-1]["type"] == "done"
            closing = await asyncio.wait_for(busy.receive(), 5)
            assert (closing.type, closing.data) == (WSMsgType.CLOSE, 1001)
        assert await asyncio.to_thread(sidecar.process.wait, 10) == 0
        # Each response on a socket is one log line, as an HTTP request is.
        lines = [orjson.loads(line) for line in sidecar.logs().splitlines()
                 if '"method":"WS"' in line]
        assert len(lines) == 1
        assert lines[0]["path"] == PATH and lines[0]["status"] == 200
        assert lines[0]["target"] == "mock/mock-gpt"
    finally:
        sidecar.stop()


async def test_a_thousand_idle_sockets_cost_little_memory_and_chat_is_still_served(
        upstream: MockUpstream, tmp_path: Path) -> None:
    sidecar = start_sidecar(base_config(upstream), tmp_path)
    try:
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0)) as session:
            before = rss_bytes(sidecar.process.pid)
            sockets = [await session.ws_connect(sidecar.url + PATH) for _ in range(1000)]
            added = rss_bytes(sidecar.process.pid) - before
            assert added < 150 * 1024 * 1024, f"{added / 2**20:.1f} MiB for 1,000 sockets"
            started = time.perf_counter()
            async with session.post(sidecar.url + "/v1/chat/completions",
                                    json=chat("still served")) as reply:
                assert reply.status == 200
                assert (await reply.json())["choices"][0]["message"]["content"] == \
                    "Hello from mock: still served"
            assert time.perf_counter() - started < 1.0
            await sockets[-1].send_json(chat("the last socket"))
            assert (await until_done(sockets[-1]))[-1]["type"] == "done"
            await asyncio.gather(*(s.close() for s in sockets))
    finally:
        sidecar.stop()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_an_upstream_event_with_usage_that_is_not_an_object_passes_as_over_sse(
        upstream: MockUpstream, scripted: ScriptedUpstream, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(upstream, tmp_path, monkeypatch, extra=f"""
[providers.scripted]
kind = "openai"
base_url = "{scripted.base_url}"

[models."scripted"]
targets = [ {{ provider = "scripted", model = "scripted" }} ]
""")
    script = ['{"usage": 5, "note": "usage" ', '["usage"]', chat_chunk("ok", finish="stop")]
    async with opened(app) as (url, session), session.ws_connect(url + PATH) as socket:
        await socket.send_json({**chat("hi"), "model": "scripted", "script": script})
        messages: list[Any] = []
        while True:
            message = await asyncio.wait_for(socket.receive(), 5)
            messages.append(message.data)
            if '"type":"done"' in message.data or '"type":"error"' in message.data:
                break
    assert '"type":"done"' in messages[-1]
    assert messages[0] == '{"usage": 5, "note": "usage" ' and messages[1] == '["usage"]'
