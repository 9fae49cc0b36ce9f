"""TLS to a loopback server whose CA the test generates (verification, SNI, ALPN, the minimum
version, an untrusted CA refused), and an egress proxy on loopback: CONNECT tunnels for https,
absolute URLs for http, its credentials sent and never quoted."""

from __future__ import annotations

import asyncio
import base64
import ssl
from pathlib import Path

import pytest

from sidecar.security.certs import generate_tls
from sidecar.transport import UpstreamClient, tls_context
from sidecar.transport.dial import Origin, choose_proxy
from sidecar.transport.errors import ConnectFailed
from tests.support.egress_proxy import egress_proxy
from tests.support.raw_upstream import Request, answer, raw_upstream


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ours = generate_tls(tmp_path_factory.mktemp("tls"), ["localhost", "127.0.0.1"])
    other = generate_tls(tmp_path_factory.mktemp("other"), ["localhost", "127.0.0.1"])
    return {"ca": ours[0], "cert": ours[2], "key": ours[3], "other_ca": other[0]}


def server_context(certs: dict[str, Path], **options: object) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["cert"], certs["key"])
    context.set_alpn_protocols(["h2", "http/1.1"])
    context.sni_callback = lambda tls, name, _context: sni.append(name)  # type: ignore[assignment]
    for name, value in options.items():
        setattr(context, name, value)
    return context


seen_tls: list[tuple[str | None, str | None]] = []
sni: list[str | None] = []  # the names clients asked for, as the servers' handshakes saw them


async def tls_ok(request: Request, writer: asyncio.StreamWriter) -> bool:
    tls = writer.get_extra_info("ssl_object")
    seen_tls.append((sni[-1] if sni else None, tls.selected_alpn_protocol()))
    writer.write(answer())
    return True


async def fetch(client: UpstreamClient) -> bytes:
    response = await client.request("POST", "/v1/x", client.header_block({}), b"{}",
                                    headers_timeout_s=2)
    body = await response.read_all(2, 1 << 20)
    response.release()
    return body


async def test_tls_with_the_configured_ca_sends_sni_and_asks_for_http11(
        certs: dict[str, Path]) -> None:
    seen_tls.clear()
    async with raw_upstream(tls_ok, tls=server_context(certs)) as upstream:
        context = await asyncio.to_thread(tls_context, str(certs["ca"]))
        client = UpstreamClient(f"https://localhost:{upstream.port}/v1", tls=context)
        assert await fetch(client) == b'{"ok":true}'
        assert await fetch(client) == b'{"ok":true}'
        assert upstream.connections == 1
        assert seen_tls[0] == ("localhost", "http/1.1")
        assert upstream.requests[0].header("host") == f"localhost:{upstream.port}"
        await client.close()


@pytest.mark.parametrize("trust", ["system", "other_ca"])
async def test_a_certificate_from_an_untrusted_ca_is_refused(certs: dict[str, Path],
                                                             trust: str) -> None:
    async with raw_upstream(tls_ok, tls=server_context(certs)) as upstream:
        ca = None if trust == "system" else str(certs["other_ca"])
        context = await asyncio.to_thread(tls_context, ca)
        client = UpstreamClient(f"https://localhost:{upstream.port}", tls=context)
        with pytest.raises(ConnectFailed, match="certificate"):
            await fetch(client)
        assert upstream.requests == []  # nothing was sent to it
        await client.close()


async def test_a_name_the_certificate_does_not_cover_is_refused(
        certs: dict[str, Path], tmp_path: Path) -> None:
    elsewhere = generate_tls(tmp_path, ["upstream.example"])
    context = server_context(certs)
    context.load_cert_chain(elsewhere[2], elsewhere[3])
    async with raw_upstream(tls_ok, tls=context) as upstream:
        trust = await asyncio.to_thread(tls_context, str(elsewhere[0]))
        client = UpstreamClient(f"https://localhost:{upstream.port}", tls=trust)
        with pytest.raises(ConnectFailed, match="certificate"):
            await fetch(client)
        await client.close()


def test_the_tls_context_verifies_and_asks_for_tls_1_2_at_least(
        certs: dict[str, Path]) -> None:
    for context in (tls_context(None), tls_context(str(certs["ca"]))):
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_https_through_a_connect_proxy_is_tls_end_to_end(certs: dict[str, Path]) -> None:
    seen_tls.clear()
    async with raw_upstream(tls_ok, tls=server_context(certs)) as upstream, \
            egress_proxy() as proxy:
        context = await asyncio.to_thread(tls_context, str(certs["ca"]))
        client = UpstreamClient(f"https://localhost:{upstream.port}", tls=context,
                                proxy=f"http://user:pa%3Ass@127.0.0.1:{proxy.port}")
        assert await fetch(client) == b'{"ok":true}'
        assert await fetch(client) == b'{"ok":true}'
        assert len(proxy.heads) == 1  # one tunnel, kept alive
        connect = proxy.heads[0]
        assert connect.line == f"CONNECT localhost:{upstream.port} HTTP/1.1"
        assert connect.header("proxy-authorization") == "Basic " + base64.b64encode(
            b"user:pa:ss").decode()
        assert seen_tls[0] == ("localhost", "http/1.1")
        # The proxy never saw the request itself: only the tunnel's TLS bytes.
        assert upstream.requests[0].line == "POST /v1/x HTTP/1.1"
        await client.close()


async def test_plain_http_through_a_proxy_names_the_whole_url() -> None:
    async with egress_proxy() as proxy:
        client = UpstreamClient("http://upstream.example:8080/v1",
                                proxy=f"http://127.0.0.1:{proxy.port}")
        assert await fetch(client) == b"POST http://upstream.example:8080/v1/x HTTP/1.1"
        await client.close()


async def test_a_proxy_that_refuses_the_tunnel_fails_without_quoting_its_password(
        certs: dict[str, Path]) -> None:
    async with egress_proxy(refuse=True) as proxy:
        context = await asyncio.to_thread(tls_context, str(certs["ca"]))
        client = UpstreamClient("https://localhost:1", tls=context,
                                proxy=f"http://user:hunter2@127.0.0.1:{proxy.port}")
        with pytest.raises(ConnectFailed) as caught:
            await fetch(client)
        assert "407" in str(caught.value) and "hunter2" not in str(caught.value)
        assert "hunter2" not in repr(client._proxy)
        await client.close()


def test_the_environment_proxy_is_used_unless_no_proxy_or_loopback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    chosen = choose_proxy(Origin.of("https://api.example.com/v1"), None)
    assert chosen is not None and (chosen.host, chosen.port) == ("127.0.0.1", 3128)
    assert choose_proxy(Origin.of("https://llm.internal.example"), None) is None
    assert choose_proxy(Origin.of("https://127.0.0.1:8443"), None) is None
    assert choose_proxy(Origin.of("http://api.example.com"), None) is None  # no HTTP_PROXY
    assert choose_proxy(Origin.of("https://api.example.com"), "") is None  # "" = none
