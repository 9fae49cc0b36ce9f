"""TLS material and the listener's context without a sidecar: what the generated certificates
say (names, usages, CA, validity, key file modes), and real handshakes in memory against the
server context (versions refused, client certificates required, a certificate reloaded)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import shutil
import ssl
import stat
import time
import warnings
from pathlib import Path

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.security.certs import generate_issuer, generate_tls, write_private
from sidecar.security.tls import reload_certificate, server_context
from sidecar.settings import ServerSettings


@pytest.fixture
def material(tmp_path: Path) -> Path:
    # Made for each test (a few milliseconds): mutation testing credits the code a fixture
    # runs to the first test that asks for it, so a shared one would leave the others unseen.
    out = tmp_path / "tls"
    generate_tls(out, ["localhost", "127.0.0.1"], days=30)
    return out


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_the_files_are_written_with_private_keys_readable_by_the_owner_only(
        material: Path) -> None:
    for name in ("ca-key.pem", "key.pem", "client-key.pem"):
        assert stat.S_IMODE((material / name).stat().st_mode) == 0o600
    for name in ("ca.pem", "cert.pem", "client.pem"):
        assert b"BEGIN CERTIFICATE" in (material / name).read_bytes()


def test_a_private_key_is_created_owner_only_and_an_existing_file_made_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    existing = tmp_path / "existing.pem"
    existing.write_bytes(b"old")
    existing.chmod(0o644)
    write_private(existing, key)  # O_CREAT's mode does not apply to a file already there
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in existing.read_bytes()
    # Without the chmod, a new file is still created 0600: never readable by others, not
    # even between its creation and the chmod.
    monkeypatch.setattr(os, "chmod", lambda *args: None)
    old_umask = os.umask(0o022)
    try:
        write_private(tmp_path / "new.pem", key)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "new.pem").stat().st_mode) == 0o600


def test_the_defaults_make_folders_a_years_certificates_and_a_kid_of_dev_1(
        tmp_path: Path) -> None:
    paths = generate_tls(tmp_path / "a" / "b", ["localhost"])
    assert [p.name for p in paths] == ["ca.pem", "ca-key.pem", "cert.pem", "key.pem",
                                       "client.pem", "client-key.pem"]
    cert = load(tmp_path / "a" / "b" / "cert.pem")
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(
        days=365, minutes=5)
    private, public, jwks = generate_issuer(tmp_path / "c" / "d")
    assert [private.name, public.name, jwks.name] == ["issuer-key.pem", "issuer.pem",
                                                      "jwks.json"]
    assert private.parent == tmp_path / "c" / "d"
    assert orjson.loads(jwks.read_bytes())["keys"][0]["kid"] == "dev-1"


def test_the_server_certificate_names_its_hosts_and_serves_only(material: Path) -> None:
    cert = load(material / "cert.pem")
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(usage.value) == [ExtendedKeyUsageOID.SERVER_AUTH] and not usage.critical
    assert not cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    assert cert.issuer == load(material / "ca.pem").subject


def test_the_client_certificate_is_for_clients_only(material: Path) -> None:
    cert = load(material / "client.pem")
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert common_name == "llm-sidecar client"
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_the_ca_signs_certificates_and_nothing_below_it(material: Path) -> None:
    cert = load(material / "ca.pem")
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is True and basic.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert usage.value.digital_signature and not usage.value.key_encipherment
    assert not (usage.value.content_commitment or usage.value.data_encipherment
                or usage.value.key_agreement)
    assert cert.subject == cert.issuer
    organisation = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    assert organisation == "llm-sidecar development"


def test_certificates_are_valid_from_just_before_now_for_the_days_asked(material: Path) -> None:
    cert = load(material / "cert.pem")
    now = dt.datetime.now(dt.UTC)
    assert now - dt.timedelta(minutes=6) < cert.not_valid_before_utc < now
    assert abs(cert.not_valid_after_utc - (now + dt.timedelta(days=30))) < dt.timedelta(minutes=5)


def test_certificates_are_valid_from_now_in_any_local_time_zone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "XYZ-9")  # nine hours ahead of UTC
    time.tzset()
    try:
        generate_tls(tmp_path, ["localhost"], days=1)
    finally:
        monkeypatch.undo()
        time.tzset()
    cert = load(tmp_path / "cert.pem")
    now = dt.datetime.now(dt.UTC)
    assert now - dt.timedelta(minutes=6) < cert.not_valid_before_utc < now


def test_the_issuer_keys_and_jwks_carry_the_kid(tmp_path: Path) -> None:
    private, public, jwks = generate_issuer(tmp_path / "issuer", kid="k9")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"BEGIN PUBLIC KEY" in public.read_bytes()
    loaded = serialization.load_pem_public_key(public.read_bytes())
    assert isinstance(loaded, rsa.RSAPublicKey) and loaded.key_size == 2048
    assert jwks.read_text().startswith('{\n  "keys": [\n')  # indented for a person
    (key,) = orjson.loads(jwks.read_bytes())["keys"]
    assert key["kid"] == "k9" and key["use"] == "sig" and key["alg"] == "RS256"
    assert key["kty"] == "RSA" and "d" not in key


def settings(material: Path, client_ca: bool = False) -> ServerSettings:
    return ServerSettings(tls_cert=str(material / "cert.pem"), tls_key=str(material / "key.pem"),
                          tls_client_ca=str(material / "ca.pem") if client_ca else "")


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """A whole TLS handshake through memory buffers; returns the client's side."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_side = server.wrap_bio(to_server, to_client, server_side=True)
    from_server, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(from_server, from_client, server_hostname="localhost")
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client_side), ("server", server_side)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        to_server.write(from_client.read())
        from_server.write(to_client.read())
        if all(done.values()):
            # TLS 1.3 sends the server's verdict on a client certificate after the handshake.
            client_side.write(b"x")
            to_server.write(from_client.read())
            server_side.read(1)
            return client_side
    raise AssertionError("the handshake did not finish")


def client_context(material: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(material / "ca.pem"))


def test_a_client_trusting_the_ca_completes_a_handshake(material: Path) -> None:
    client = handshake(server_context(settings(material)), client_context(material))
    assert client.version() in ("TLSv1.2", "TLSv1.3")
    assert client.compression() is None


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_before_1_2_is_refused(material: Path) -> None:
    old = client_context(material)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        handshake(server_context(settings(material)), old)


def test_tls_1_2_offers_only_forward_secret_aead_suites(material: Path) -> None:
    client = client_context(material)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    side = handshake(server_context(settings(material)), client)
    cipher = side.cipher()
    assert cipher is not None and cipher[0].startswith("ECDHE-")
    assert "GCM" in cipher[0] or "CHACHA20" in cipher[0]


def test_a_client_ca_makes_a_client_certificate_required(material: Path) -> None:
    server = server_context(settings(material, client_ca=True))
    assert server.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ssl.SSLError):
        handshake(server, client_context(material))
    with_cert = client_context(material)
    with_cert.load_cert_chain(str(material / "client.pem"), str(material / "client-key.pem"))
    assert handshake(server, with_cert).version() is not None


def test_a_reload_serves_the_new_certificate_and_a_bad_pair_keeps_the_old(
        material: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    shutil.copytree(material, live)
    current = settings(live)
    server = server_context(current)
    first = handshake(server, client_context(live)).getpeercert()
    generate_tls(tmp_path / "next", ["localhost"], days=30)
    for name in ("cert.pem", "key.pem"):
        shutil.copy(tmp_path / "next" / name, live / name)
    assert reload_certificate(server, current) is True
    shutil.copy(tmp_path / "next" / "ca.pem", live / "ca.pem")
    second = handshake(server, client_context(live)).getpeercert()
    assert first is not None and second is not None
    assert first["serialNumber"] != second["serialNumber"]
    (live / "key.pem").write_bytes((material / "key.pem").read_bytes())  # a mismatched pair
    assert reload_certificate(server, current) is False
    third = handshake(server, client_context(live)).getpeercert()
    assert third is not None and third["serialNumber"] == second["serialNumber"]


def test_the_server_context_is_a_servers_with_pythons_defaults_and_no_renegotiation(
        material: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated way of making a context
        context = server_context(settings(material))
    assert context.protocol is ssl.PROTOCOL_TLS_SERVER
    defaults = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).options
    assert context.options & defaults == defaults
    assert context.options & ssl.OP_NO_RENEGOTIATION


def test_a_reload_with_a_client_ca_loads_it_again_and_logs_the_certificate(
        material: Path, caplog: pytest.LogCaptureFixture) -> None:
    current = settings(material, client_ca=True)
    server = server_context(current)
    with caplog.at_level(logging.INFO, logger="sidecar.tls"), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reload_certificate(server, current) is True
    (record,) = caplog.records
    assert record.getMessage() == "certificate reloaded"
    assert record.__dict__["fields"] == {"cert": str(material / "cert.pem")}
    with_cert = client_context(material)
    with_cert.load_cert_chain(str(material / "client.pem"), str(material / "client-key.pem"))
    assert handshake(server, with_cert).version() is not None


def test_a_failed_reload_logs_why(material: Path, tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    current = settings(material)
    server = server_context(current)
    gone = ServerSettings(tls_cert=str(tmp_path / "none.pem"), tls_key=str(tmp_path / "none.pem"))
    with caplog.at_level(logging.INFO, logger="sidecar.tls"):
        assert reload_certificate(server, gone) is False
    (record,) = caplog.records
    assert record.getMessage() == "certificate reload failed; keeping the current one"
    assert "No such file" in record.__dict__["fields"]["error"]
