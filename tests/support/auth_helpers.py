"""Real keys and real tokens for the auth tests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson

from sidecar.security.certs import generate_issuer

ISSUER = "https://idp.test/"
AUDIENCE = "llm-sidecar"


@dataclass
class Issuer:
    private_pem: bytes
    public_pem: bytes
    public_path: Path
    jwks_path: Path
    kid: str

    def token(self, *, algorithm: str = "RS256", headers: dict[str, Any] | None = None,
              drop: tuple[str, ...] = (), **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "tenant-a", "iat": now,
                                "exp": now + 600, "scope": "sidecar:chat"}
        body.update(claims)
        for name in drop:
            body.pop(name, None)
        return jwt.encode(body, self.private_pem, algorithm=algorithm,
                          headers={"kid": self.kid, **(headers or {})})


def make_issuer(directory: Path, kid: str = "dev-1") -> Issuer:
    private, public, jwks = generate_issuer(directory, kid)
    return Issuer(private.read_bytes(), public.read_bytes(), public, jwks, kid)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_header_token(header: dict[str, Any], **claims: Any) -> str:
    """A token with whatever header, and a signature that cannot verify."""
    return f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(claims))}.{_b64(b'x' * 32)}"


def unsigned_token(**claims: Any) -> str:
    """alg=none: a header, a payload and an empty signature."""
    header = _b64(orjson.dumps({"alg": "none", "typ": "JWT"}))
    return f"{header}.{_b64(orjson.dumps(claims))}."


def hmac_token_with_public_key(public_pem: bytes, **claims: Any) -> str:
    """The classic confusion attack: HS256 keyed with the server's public RSA key."""
    header = _b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    payload = _b64(orjson.dumps(claims))
    signature = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def jwt_config(key_line: str, *, leeway: float = 30, extra: str = "") -> str:
    return f"""
[auth]
mode = "jwt"
algorithms = ["RS256"]
{key_line}
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
leeway_s = {leeway}
{extra}
"""
