"""The transport's provider keys at load time: a proxy URL that cannot be used, a CA file that
is not there or holds no certificate, and a header that would break the request's framing are
refused with a message naming the key (and never the proxy's password)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar import config
from sidecar.config import ConfigError
from sidecar.security.certs import generate_tls

BASE = """
[server]
host = "127.0.0.1"
port = 0

[providers.up]
kind = "openai"
base_url = "https://api.example.com/v1"
{extra}

[models."m"]
targets = [ {{ provider = "up", model = "m", weight = 1 }} ]
"""


@pytest.mark.parametrize(("extra", "key"), [
    ('proxy = "socks5://user:s3cret-pass@127.0.0.1:1080"', "providers.up.proxy"),
    ('ca_file = "/nonexistent/ca.pem"', "providers.up.ca_file"),
    ('ca_file = "{not_a_ca}"', "providers.up.ca_file"),
    ('headers = { "X-Org" = "a\\r\\nX-Injected: 1" }', "providers.up.headers"),
])
def test_unusable_transport_settings_are_refused_at_load(tmp_path: Path, extra: str,
                                                         key: str) -> None:
    not_a_ca = tmp_path / "ca.pem"
    not_a_ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    path = tmp_path / "sidecar.toml"
    path.write_text(BASE.format(extra=extra.replace("{not_a_ca}", str(not_a_ca))))
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert f"`{key}`" in str(caught.value)
    assert "s3cret-pass" not in str(caught.value)


def test_usable_transport_settings_load(tmp_path: Path) -> None:
    ca = generate_tls(tmp_path / "tls", ["localhost"])[0]
    path = tmp_path / "sidecar.toml"
    path.write_text(BASE.format(extra=f'proxy = "http://u:p@127.0.0.1:3128"\nca_file = "{ca}"\n'
                                      "timeout_headers_s = 30\nkeepalive_s = 5"))
    provider = config.load(path).providers["up"]
    assert provider.proxy == "http://u:p@127.0.0.1:3128"  # type: ignore[union-attr]
    assert provider.timeout_headers_s == 30 and provider.keepalive_s == 5  # type: ignore[union-attr]
