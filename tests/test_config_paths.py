"""Relative paths in a config file resolve against the file's directory, whatever the working
directory: a config moves together with the key files beside it."""

from __future__ import annotations

import os
from pathlib import Path

from sidecar import config
from tests.support.sidecar import start_sidecar
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "x"}]


def moved_config(mock: MockUpstream) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = 0

[providers.up]
kind = "openai"
base_url = "{mock.base_url}"
api_key_file = "keys/up"

[providers.here]
kind = "local"
model = "models/tiny"

[providers.builtin]
kind = "local"

[models."m"]
targets = [ {{ provider = "up" }} ]

[auth]
mode = "none"
public_key_file = "tokens/issuer.pem"

[routing]
state_file = "../var/routes.json"
probe_interval_s = 0
"""


def test_every_path_written_in_the_file_is_taken_from_its_directory(
        tmp_path: Path, mock_upstream: MockUpstream) -> None:
    etc = tmp_path / "etc"
    (etc / "keys").mkdir(parents=True)
    (etc / "keys" / "up").write_text("sk-beside-the-config-0123\n")
    (etc / "sidecar.toml").write_text(moved_config(mock_upstream))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = Path.cwd()
    os.chdir(elsewhere)
    try:
        settings = config.load("../etc/sidecar.toml")
    finally:
        os.chdir(before)
    assert settings.api_keys["up"].reveal() == "sk-beside-the-config-0123"
    assert settings.providers["here"].model == str(etc / "models" / "tiny")  # type: ignore[union-attr]
    assert settings.providers["builtin"].model == "builtin:smollm2-135m-instruct"  # type: ignore[union-attr]
    assert settings.auth.public_key_file == str(etc / "tokens" / "issuer.pem")
    assert Path(settings.routing.state_file).resolve() == tmp_path / "var" / "routes.json"


def test_a_default_path_stays_relative_to_the_working_directory(
        tmp_path: Path, mock_upstream: MockUpstream) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "up").write_text("sk-x-0123456789\n")
    text = moved_config(mock_upstream).replace('state_file = "../var/routes.json"\n', "")
    (tmp_path / "sidecar.toml").write_text(text)
    assert config.load(tmp_path / "sidecar.toml").routing.state_file == "state/routes.json"


def test_a_started_sidecar_sends_the_key_from_the_file_beside_its_config(
        tmp_path: Path, upstream: MockUpstream) -> None:
    """The process starts in the repository; its config and key live in another directory."""
    workdir = tmp_path / "etc"
    (workdir / "keys").mkdir(parents=True)
    (workdir / "keys" / "up").write_text("sk-beside-the-config-0123\n")
    text = moved_config(upstream).split("[providers.here]")[0] + \
        '[models."m"]\ntargets = [ { provider = "up" } ]\n[routing]\nstate_file = "routes.json"\n'
    sidecar = start_sidecar(text, workdir)
    try:
        reply = sidecar.client().chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
        assert reply.choices[0].message.content
        assert upstream.requests[-1].headers["Authorization"] == \
            "Bearer sk-beside-the-config-0123"
        assert not (Path.cwd() / "routes.json").exists()
    finally:
        assert sidecar.stop() == 0
