"""The transport as the sidecar uses it: the app served in the test's loop (blockbuster on),
the official openai client in front, and behind it an https upstream whose CA the test
generated (`ca_file`), reached through an egress proxy on loopback (`proxy`), whole answers
and streams; a malformed upstream answer is a 502 in OpenAI's error shape, and headers later
than `timeout_headers_s` a 504."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import openai
import orjson
import pytest

from sidecar import config
from sidecar.app import create_app
from sidecar.security.certs import generate_tls
from tests.support.egress_proxy import Proxy, egress_proxy
from tests.support.in_process import no_blocking, serving
from tests.support.raw_upstream import RawUpstream, Request, answer, raw_upstream

USER = [{"role": "user", "content": "hi"}]
KEY = "sk-transport-test-0123456789"


def chat_answer(text: str) -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "up",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def chunk_event(text: str, finish: str | None = None) -> bytes:
    delta = {"content": text} if text else {}
    event = orjson.dumps({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "up",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})
    data = b"data: " + event + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


async def upstream_answer(request: Request, writer: asyncio.StreamWriter) -> bool:
    body = orjson.loads(request.body)
    if body.get("slow_head"):
        await asyncio.sleep(1.0)
    if body.get("malformed"):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked"
                     b"\r\n\r\n{}")
        return False
    if not body.get("stream"):
        writer.write(answer(chat_answer("over TLS")))
        return True
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    for word in ("one", "two", "three"):
        writer.write(chunk_event(word))
        await writer.drain()
        await asyncio.sleep(0.001)
    done = b"data: [DONE]\n\n"
    writer.write(chunk_event("", "stop") + b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
    return True


@dataclass
class Setup:
    client: openai.AsyncOpenAI
    upstream: RawUpstream
    proxy: Proxy


@pytest.fixture
async def through_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                        ) -> AsyncIterator[Setup]:
    monkeypatch.setenv("TRANSPORT_TEST_KEY", KEY)
    ca, _, cert, key, *_ = generate_tls(tmp_path / "tls", ["localhost"])
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    async with raw_upstream(upstream_answer, tls=tls) as upstream, egress_proxy() as proxy:
        path = tmp_path / "sidecar.toml"
        path.write_text(f"""
[server]
host = "127.0.0.1"
port = 0

[routing]
probe_interval_s = 0

[providers.secure]
kind = "openai"
base_url = "https://localhost:{upstream.port}/v1"
api_key_env = "TRANSPORT_TEST_KEY"
ca_file = "{ca}"
proxy = "http://127.0.0.1:{proxy.port}"
max_retries = 0
timeout_read_s = 2
timeout_headers_s = 0.3

[models."m"]
targets = [ {{ provider = "secure", model = "up", weight = 1 }} ]
""")
        async with serving(create_app(config.load(path))) as url, openai.AsyncOpenAI(
                base_url=url + "/v1", api_key="unused", max_retries=0) as client:
            with no_blocking():
                yield Setup(client, upstream, proxy)


async def test_answers_and_streams_through_a_proxy_over_verified_tls(
        through_proxy: Setup) -> None:
    client = through_proxy.client
    reply = await client.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "over TLS"
    stream = await client.chat.completions.create(model="m", messages=USER,  # type: ignore[arg-type]
                                                  stream=True)
    words = [chunk.choices[0].delta.content async for chunk in stream
             if chunk.choices and chunk.choices[0].delta.content]
    assert words == ["one", "two", "three"]
    again = await client.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
    assert again.choices[0].message.content == "over TLS"
    # One tunnel served all three: the stream's connection went back to the pool.
    assert len(through_proxy.proxy.heads) == 1
    assert through_proxy.proxy.heads[0].line.startswith("CONNECT localhost:")
    sent = through_proxy.upstream.requests[0]
    assert sent.line == "POST /v1/chat/completions HTTP/1.1"
    assert sent.header("authorization") == f"Bearer {KEY}"
    assert sent.header("accept-encoding") == "identity"
    assert through_proxy.proxy.heads[0].header("authorization") is None  # the key stays inside


async def test_a_malformed_upstream_answer_is_a_502_in_openai_shape(
        through_proxy: Setup) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        await through_proxy.client.chat.completions.create(
            model="m", messages=USER, extra_body={"malformed": True})  # type: ignore[arg-type]
    assert caught.value.status_code == 502
    error = caught.value.body
    assert isinstance(error, dict) and error["type"] == "upstream_error"
    assert "not a valid HTTP response" in error["message"]
    assert "Transfer-Encoding" in error["message"]


async def test_headers_slower_than_timeout_headers_s_are_a_504(through_proxy: Setup) -> None:
    started = asyncio.get_running_loop().time()
    with pytest.raises(openai.APIStatusError) as caught:
        await through_proxy.client.chat.completions.create(
            model="m", messages=USER, extra_body={"slow_head": True})  # type: ignore[arg-type]
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
    # timeout_headers_s (0.3 s) applied, not timeout_read_s (2 s).
    assert asyncio.get_running_loop().time() - started < 0.9
