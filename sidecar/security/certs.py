"""Development key material made with `cryptography`: a CA with server and client
certificates for TLS, and a key pair for signing tokens. Private keys are written 0600."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from jwt.algorithms import RSAAlgorithm

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def write_private(path: Path, key: PrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    os.chmod(path, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llm-sidecar development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, public_key: object, issuer: x509.Name, signer: PrivateKey,
                 days: int, *, ca: bool = False, hosts: list[str] | None = None,
                 client: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def generate_tls(out: Path, hosts: list[str], days: int = 365) -> list[Path]:
    """ca.pem, ca-key.pem, cert.pem + key.pem (server, for `hosts`), client.pem + client-key.pem."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("llm-sidecar development CA", ca_key.public_key(),
                           _name("llm-sidecar development CA"), ca_key, days, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _certificate(hosts[0], server_key.public_key(), ca_cert.subject, ca_key, days,
                               hosts=hosts)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _certificate("llm-sidecar client", client_key.public_key(), ca_cert.subject,
                               ca_key, days, client=True)
    paths = [out / name for name in ("ca.pem", "ca-key.pem", "cert.pem", "key.pem",
                                     "client.pem", "client-key.pem")]
    _write_cert(paths[0], ca_cert)
    write_private(paths[1], ca_key)
    _write_cert(paths[2], server_cert)
    write_private(paths[3], server_key)
    _write_cert(paths[4], client_cert)
    write_private(paths[5], client_key)
    return paths


def generate_issuer(out: Path, kid: str = "dev-1") -> list[Path]:
    """issuer-key.pem (RSA, private), issuer.pem (public) and jwks.json (public, with `kid`)."""
    out.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public, jwks = out / "issuer-key.pem", out / "issuer.pem", out / "jwks.json"
    write_private(private, key)
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwks.write_bytes(orjson.dumps({"keys": [{**jwk, "kid": kid, "use": "sig", "alg": "RS256"}]},
                                  option=orjson.OPT_INDENT_2))
    return [private, public, jwks]
