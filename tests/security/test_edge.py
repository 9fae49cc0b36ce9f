"""The edge under abuse: slow clients are cut off by timeouts while others are served, oversize
headers get 431, bodies are measured after decompression (and refused before they are sent when
announced with Expect: 100-continue), connections are capped, no CORS."""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from sidecar.security.connections import c_parser_in_use
from tests.support.sidecar import Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]
EDGE = """header_timeout_s = 1
body_timeout_s = 1
max_connections = 8
max_headers = 50
max_body_bytes = 4096"""


@pytest.fixture(scope="module")
def edge(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Sidecar]:
    instance = start_sidecar(base_config(mock_upstream, server=EDGE),
                             tmp_path_factory.mktemp("edge"))
    yield instance
    instance.stop()


def address(sidecar: Sidecar) -> tuple[str, int]:
    host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def served(sidecar: Sidecar) -> bool:
    response = httpx.post(sidecar.base_url + "/chat/completions", timeout=5,
                          json={"model": "gpt-test", "messages": USER})
    return response.status_code == 200


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Read until the server closes the connection; fail if it stays open too long."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {seconds}s")
    return received


def test_slowloris_headers_are_cut_off_while_others_are_served(edge: Sidecar) -> None:
    sock = socket.create_connection(address(edge))
    stop = threading.Event()
    started = time.monotonic()

    def trickle() -> None:
        for byte in (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
                     + b"a" * 50):
            if stop.is_set():
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.2)

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        assert served(edge)  # another client is served meanwhile
        closed_within(sock, 4)
        assert time.monotonic() - started < 4
    finally:
        stop.set()
        sender.join()
        sock.close()
    assert served(edge)


def test_slow_body_gets_408_and_the_connection_closed(edge: Sidecar) -> None:
    body = orjson.dumps({"model": "gpt-test", "messages": USER})
    with socket.create_connection(address(edge)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10])
        started = time.monotonic()
        answer = closed_within(sock, 4)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"code":"request_timeout"' in answer
    assert time.monotonic() - started < 3
    assert served(edge)


def test_too_many_headers_is_431(edge: Sidecar) -> None:
    headers = {f"X-Filler-{i}": "x" for i in range(200)}
    response = httpx.post(edge.base_url + "/chat/completions", headers=headers,
                          json={"model": "gpt-test", "messages": USER})
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "request_header_fields_too_large"
    assert served(edge)


def test_an_oversize_header_is_431(edge: Sidecar) -> None:
    response = httpx.get(edge.url + "/healthz", headers={"X-Big": "y" * 40_000})
    assert response.status_code == 431
    assert served(edge)


def test_an_oversize_authorization_header_is_not_quoted_in_the_log(edge: Sidecar) -> None:
    secret = "sk-oversize-0123456789abcdef"
    response = httpx.get(edge.base_url + "/models",
                         headers={"Authorization": f"Bearer {secret}" + "z" * 40_000})
    assert response.status_code == 431
    assert edge.wait_for_log("refused a malformed request")
    assert secret not in edge.logs()


def test_body_size_counts_after_decompression(edge: Sidecar, upstream: MockUpstream) -> None:
    big = orjson.dumps({"model": "gpt-test", "messages": [
        {"role": "user", "content": "z" * 100_000}]})
    packed = gzip.compress(big)
    assert len(packed) < 4096 < len(big)
    response = httpx.post(edge.base_url + "/chat/completions", content=packed,
                          headers={"Content-Encoding": "gzip",
                                   "Content-Type": "application/json"})
    assert response.status_code == 413
    assert upstream.requests == []
    small = gzip.compress(orjson.dumps({"model": "gpt-test", "messages": USER}))
    fine = httpx.post(edge.base_url + "/chat/completions", content=small,
                      headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert fine.status_code == 200


def announce(sidecar: Sidecar, length: int) -> socket.socket:
    sock = socket.create_connection(address(sidecar))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                 b"Content-Length: " + str(length).encode() + b"\r\n\r\n")
    sock.settimeout(3)
    return sock


def test_an_announced_body_over_the_limit_is_413_at_once_without_100_continue(
        edge: Sidecar, upstream: MockUpstream) -> None:
    with announce(edge, 100_000) as sock:
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            pytest.fail("no answer before the body was sent")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]
    assert b"100 Continue" not in answer
    assert b'"code":"request_too_large"' in answer
    assert upstream.requests == []
    assert served(edge)


def test_an_announced_body_within_the_limit_gets_100_continue_and_is_served(
        edge: Sidecar) -> None:
    body = orjson.dumps({"model": "gpt-test", "messages": USER})
    with announce(edge, len(body)) as sock:
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_open_connections_are_capped(edge: Sidecar) -> None:
    sockets = [socket.create_connection(address(edge)) for _ in range(20)]
    try:
        time.sleep(0.3)
        refused = 0
        for sock in sockets:
            sock.settimeout(0.5)
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                if sock.recv(1024) == b"":
                    refused += 1
            except (ConnectionResetError, BrokenPipeError):
                refused += 1
            except TimeoutError:
                pass
        assert refused >= 20 - 8
    finally:
        for sock in sockets:
            sock.close()
    time.sleep(0.3)
    assert served(edge)


def test_no_cors_headers_by_default(edge: Sidecar) -> None:
    preflight = httpx.options(edge.base_url + "/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    simple = httpx.get(edge.base_url + "/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in simple.headers
    assert "access-control-allow-credentials" not in simple.headers


def test_the_c_http_parser_is_in_use(edge: Sidecar) -> None:
    assert c_parser_in_use()
    assert "C HTTP parser is not in use" not in edge.logs()
