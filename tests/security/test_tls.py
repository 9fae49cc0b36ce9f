"""TLS: real handshakes with certificates from `sidecar gen-cert`."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.sidecar import ROOT, Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]


def gen_cert(out: Path) -> Path:
    result = subprocess.run([sys.executable, "-m", "sidecar", "gen-cert", "--out", str(out),
                             "--hosts", "localhost,127.0.0.1"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gen_cert(tmp_path_factory.mktemp("certs"))


def trust(certs: Path, client: bool = False) -> ssl.SSLContext:
    """A client context that trusts the development CA (and presents the client cert)."""
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if client:
        context.load_cert_chain(certs / "client.pem", certs / "client-key.pem")
    return context


def tls_server(certs: Path, client_ca: bool = False) -> str:
    lines = f'tls_cert = "{certs / "cert.pem"}"\ntls_key = "{certs / "key.pem"}"'
    if client_ca:
        lines += f'\ntls_client_ca = "{certs / "ca.pem"}"'
    return lines


@pytest.fixture(scope="module")
def tls(mock_upstream: MockUpstream, certs: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Sidecar]:
    instance = start_sidecar(base_config(mock_upstream, server=tls_server(certs)),
                             tmp_path_factory.mktemp("tls"))
    yield instance
    instance.stop()


def port_of(sidecar: Sidecar) -> int:
    return int(sidecar.url.rsplit(":", 1)[1])


def healthy(sidecar: Sidecar, certs: Path) -> bool:
    response = httpx.get(sidecar.url + "/healthz", verify=trust(certs))
    return response.status_code == 200


def test_gen_cert_writes_private_keys_0600(certs: Path) -> None:
    for name in ("ca-key.pem", "key.pem", "client-key.pem"):
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o600
    for name in ("ca.pem", "cert.pem", "client.pem"):
        assert (certs / name).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_openai_client_over_tls(tls: Sidecar, certs: Path) -> None:
    assert tls.url.startswith("https://")
    client = openai.OpenAI(base_url=tls.base_url, api_key="x", max_retries=0,
                           http_client=httpx.Client(verify=trust(certs)))
    reply = client.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "Hello from mock: hi"
    chunks = list(client.chat.completions.create(model="gpt-test", messages=USER,  # type: ignore[arg-type]
                                                 stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_negotiates_tls_1_2_or_newer(tls: Sidecar, certs: Path) -> None:
    context = trust(certs)
    with socket.create_connection(("127.0.0.1", port_of(tls))) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as sock:
        assert sock.version() in ("TLSv1.2", "TLSv1.3")


def test_plain_http_to_the_tls_port_is_refused(tls: Sidecar, certs: Path) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls.url.replace("https://", "http://") + "/healthz", timeout=3)
    assert healthy(tls, certs)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1 is deprecated:DeprecationWarning")
def test_tls_1_0_client_is_refused(tls: Sidecar, certs: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = ssl.TLSVersion.TLSv1
    with contextlib.suppress(ssl.SSLError):
        context.set_ciphers("ALL:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", port_of(tls))) as raw, \
            pytest.raises((ssl.SSLError, ConnectionResetError)):
        context.wrap_socket(raw, server_hostname="localhost")
    assert healthy(tls, certs)


def test_mutual_tls_requires_a_client_certificate(mock_upstream: MockUpstream, certs: Path,
                                                  tmp_path: Path) -> None:
    sidecar = start_sidecar(base_config(mock_upstream, server=tls_server(certs, client_ca=True)),
                            tmp_path)
    try:
        with pytest.raises(httpx.HTTPError):
            httpx.get(sidecar.url + "/healthz", verify=trust(certs))
        with_cert = httpx.Client(verify=trust(certs, client=True))
        assert with_cert.get(sidecar.url + "/healthz").status_code == 200
    finally:
        sidecar.stop()


def served_serial(sidecar: Sidecar) -> int:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port_of(sidecar))) as raw, \
            context.wrap_socket(raw) as sock:
        der = sock.getpeercert(binary_form=True)
    from cryptography import x509

    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_sighup_reloads_the_certificate_without_a_restart(mock_upstream: MockUpstream,
                                                          tmp_path: Path) -> None:
    live = gen_cert(tmp_path / "live")
    sidecar = start_sidecar(base_config(mock_upstream, server=tls_server(live)), tmp_path / "s")
    try:
        before = served_serial(sidecar)
        fresh = gen_cert(tmp_path / "fresh")
        shutil.copy(fresh / "cert.pem", live / "cert.pem")
        shutil.copy(fresh / "key.pem", live / "key.pem")
        sidecar.process.send_signal(signal.SIGHUP)
        assert sidecar.wait_for_log("certificate reloaded", timeout=5)
        after = served_serial(sidecar)
        assert after != before
        assert httpx.get(sidecar.url + "/healthz", verify=trust(fresh)).status_code == 200
        assert sidecar.process.poll() is None
    finally:
        sidecar.stop()


def test_a_broken_certificate_on_reload_keeps_the_old_one(mock_upstream: MockUpstream,
                                                          tmp_path: Path) -> None:
    live = gen_cert(tmp_path / "live")
    sidecar = start_sidecar(base_config(mock_upstream, server=tls_server(live)), tmp_path / "s")
    try:
        before = served_serial(sidecar)
        (live / "cert.pem").write_text("not a certificate")
        sidecar.process.send_signal(signal.SIGHUP)
        # A broken pair refuses the whole reload: the running config and certificate stay.
        assert sidecar.wait_for_log("config reload refused", timeout=5)
        assert "the TLS files do not load" in sidecar.logs()
        assert served_serial(sidecar) == before
    finally:
        sidecar.stop()
