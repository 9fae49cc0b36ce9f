"""Config errors name the file, the key and what is wrong; check-config prints the routes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import config
from sidecar.config import ConfigError
from sidecar.settings import Secret

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
[providers.up]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"

[models."m"]
targets = [ { provider = "up", model = "up-m", weight = 2 }, { provider = "up", weight = 1 } ]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return path


def check_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "check-config", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=30)


def test_check_config_prints_the_resolved_routes(tmp_path: Path) -> None:
    result = check_config(str(write(tmp_path, GOOD)))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "ok, 1 models, 1 providers" in lines[0]
    assert lines[2].split() == ["m", "up", "up-m", "2", "http://127.0.0.1:9/v1"]
    assert lines[3].split() == ["m", "up", "m", "1", "http://127.0.0.1:9/v1"]


def test_the_shipped_default_config_is_valid() -> None:
    result = check_config("config/sidecar.toml")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nport = 'eighty'\n" + GOOD, "`server.port`: Expected `int`, got `str`"),
        ("[server]\nprot = 8080\n" + GOOD, "`server`: Object contains unknown field `prot`"),
        (GOOD.replace('kind = "openai"', 'kind = "magic"'), "`providers.up.kind`"),
        (GOOD.replace("http://127.0.0.1:9/v1", "ftp://x"), "`providers.up.base_url`"),
        (GOOD.replace('provider = "up", model', 'provider = "nope", model'),
         "`models.m.targets[0].provider`: unknown provider 'nope' (configured: up)"),
        (GOOD.replace("weight = 2", "weight = -1"), "`models.m.targets[0].weight`"),
        (GOOD.replace("weight = 2", "weight = 0").replace("weight = 1", "weight = 0"),
         "every weight is 0"),
        ("[providers.up]\nkind='openai'\nbase_url='http://x'\n", "no model is configured"),
        ("this is = = not toml", "not valid TOML"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert str(caught.value).startswith(str(path))
    assert expected in str(caught.value)


def test_check_config_exits_non_zero_with_the_message(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 'x'\n" + GOOD)
    result = check_config(str(path))
    assert result.returncode == 2
    assert f"{path}: `server.port`" in result.stderr


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = check_config(str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "absent.toml: cannot read the config file" in result.stderr


def test_config_path_defaults_to_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    import os
    result = check_config(env={**os.environ, "SIDECAR_CONFIG": str(path)})
    assert result.returncode == 0
    assert str(path) in result.stdout


def test_api_key_from_env_is_a_secret_that_never_prints(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UP_KEY", "sk-live-secret")
    settings = config.load(write(tmp_path, GOOD.replace(
        'base_url = "http://127.0.0.1:9/v1"',
        'base_url = "http://127.0.0.1:9/v1"\napi_key_env = "UP_KEY"')))
    key = settings.api_keys["up"]
    assert isinstance(key, Secret) and key.reveal() == "sk-live-secret"
    assert "sk-live" not in repr(settings) and "sk-live" not in str(key)


def test_missing_api_key_env_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UP_KEY", raising=False)
    text = GOOD.replace('base_url = "http://127.0.0.1:9/v1"',
                        'base_url = "http://127.0.0.1:9/v1"\napi_key_env = "UP_KEY"')
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text))
    assert "`providers.up.api_key_env`: the environment variable UP_KEY is not set" in str(
        caught.value)


def test_api_key_file_is_read_and_stripped(tmp_path: Path) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_text("sk-from-file\n")
    path = write(tmp_path, GOOD.replace('base_url = "http://127.0.0.1:9/v1"',
                                        f'base_url = "http://127.0.0.1:9/v1"\n'
                                        f'api_key_file = "{keyfile}"'))
    assert config.load(path).api_keys["up"].reveal() == "sk-from-file"


def test_no_auth_is_refused_off_loopback_unless_asked_for(tmp_path: Path) -> None:
    open_text = "[server]\nhost = '0.0.0.0'\n" + GOOD
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, open_text))
    assert "`auth.mode`" in str(caught.value) and "allow_unauthenticated" in str(caught.value)
    allowed = open_text + "\n[auth]\nallow_unauthenticated = true\n"
    assert config.load(write(tmp_path, allowed)).auth.allow_unauthenticated


@pytest.mark.parametrize(("auth", "expected"), [
    ('mode = "jwt"\nissuer = "i"\naudience = "a"', "set exactly one of"),
    ('mode = "jwt"\npublic_key_file = "k"\njwks_url = "http://x/"\nissuer = "i"\naudience = "a"',
     "set exactly one of"),
    ('mode = "jwt"\npublic_key_file = "k"\naudience = "a"', "`auth.issuer`: required"),
    ('mode = "jwt"\nalgorithms = ["RS256", "HS256"]\nsecret_env = "S"\nissuer = "i"\n'
     'audience = "a"', "do not mix"),
    ('mode = "jwt"\nalgorithms = ["HS256"]\npublic_key_file = "k"\nissuer = "i"\naudience = "a"',
     "HS* algorithms go with secret_env"),
    ('mode = "jwt"\nalgorithms = ["none"]\npublic_key_file = "k"\nissuer = "i"\naudience = "a"',
     "`auth.algorithms[0]`"),
])
def test_auth_settings_are_checked(tmp_path: Path, auth: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, GOOD + "\n[auth]\n" + auth + "\n"))
    assert expected in str(caught.value)


def test_short_hmac_secret_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_SECRET", "too-short")
    auth = ('\n[auth]\nmode = "jwt"\nalgorithms = ["HS256"]\nsecret_env = "JWT_SECRET"\n'
            'issuer = "i"\naudience = "a"\n')
    with pytest.raises(ConfigError, match="at least 32 characters"):
        config.load(write(tmp_path, GOOD + auth))


def test_check_config_says_whether_a_local_engine_can_run_here(tmp_path: Path) -> None:
    shipped = (ROOT / "config" / "sidecar.toml").read_text()
    assert "providers.local: engine transformers can run here" in \
        check_config("config/sidecar.toml").stdout
    gpu = tmp_path / "gpu.toml"
    gpu.write_text(shipped.replace('engine = "auto"', 'engine = "exllamav2"'))
    result = check_config(str(gpu))
    assert result.returncode == 1
    assert 'providers.local: cannot run here: engine "exllamav2" needs a CUDA GPU' in \
        result.stderr


def test_check_config_never_says_ok_for_a_config_it_then_fails(tmp_path: Path) -> None:
    shipped = (ROOT / "config" / "sidecar.toml").read_text()
    gpu = write(tmp_path, shipped.replace('engine = "auto"', 'engine = "exllamav2"'))
    result = check_config(str(gpu))
    assert result.returncode == 1
    assert "ok" not in result.stdout.replace("model", "").split()
    assert result.stdout.splitlines()[0].startswith(f"{gpu}: not servable here")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[logging]\nlevel = 'loud'\n" + GOOD,
         '`logging.level`: Invalid enum value \'loud\' (expected one of: "debug", "error", '
         '"info", "warning")'),
        (GOOD.replace('kind = "openai"', 'kind = "magic"'),
         '`providers.up.kind`: Invalid value \'magic\' '
         '(expected one of: "openai", "anthropic", "local")'),
        ("[cache]\ncache_when = 'sometimes'\n" + GOOD, '"always", "deterministic", "never"'),
    ],
)
def test_an_enum_error_lists_the_valid_values(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text))
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nprot = 8080\n" + GOOD, "unknown field `prot`; did you mean `port`?"),
        ("sever = 1\n" + GOOD, "unknown field `sever`; did you mean `server`?"),
        ("[cache]\nenable = true\n" + GOOD, "did you mean `enabled`?"),
        (GOOD.replace("base_url", "base_urll"), "`providers.up`: Object contains unknown field "
         "`base_urll`; did you mean `base_url`?"),
        (GOOD.replace("weight = 2", "wieght = 2"), "`models.m.targets[0]`: Object contains "
         "unknown field `wieght`; did you mean `weight`?"),
        ("[providers.loc]\nkind = 'local'\nenigne = 'auto'\n" + GOOD,
         "`providers.loc`: Object contains unknown field `enigne`; did you mean `engine`?"),
    ],
)
def test_an_unknown_key_suggests_the_nearest_known_one(tmp_path: Path, text: str,
                                                      expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text))
    assert expected in str(caught.value)


def test_model_names_are_quoted_the_same_way_in_every_message(tmp_path: Path) -> None:
    dotted = GOOD.replace('[models."m"]', '[models."gpt-4.1"]')
    messages = []
    for text in (dotted.replace("weight = 2", "weight = 'x'"),
                 dotted.replace('provider = "up", model', 'provider = "nope", model'),
                 dotted.replace("weight = 2", "weight = 0").replace("weight = 1", "weight = 0")):
        with pytest.raises(ConfigError) as caught:
            config.load(write(tmp_path, text))
        messages.append(str(caught.value))
    assert all('`models."gpt-4.1".targets' in m for m in messages), messages


def test_the_host_flag_meets_the_loopback_check(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "serve", "--config", str(path), "--host",
             "0.0.0.0", "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the sidecar served without auth on 0.0.0.0")
    assert result.returncode == 2
    assert "`auth.mode`" in result.stderr and "0.0.0.0" in result.stderr


def test_the_flags_replace_the_file_before_the_checks(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"`auth\.mode`"):
        config.load(path, host="0.0.0.0")
    settings = config.load(write(tmp_path, "[server]\nhost = '0.0.0.0'\n" + GOOD),
                           host="127.0.0.1", port=9)
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 9)
    assert settings.listen_addresses == ["127.0.0.1"]


def test_a_name_is_loopback_only_by_what_it_resolves_to(tmp_path: Path) -> None:
    # Starts with "127." but is a name, and resolves nowhere (RFC 2606 keeps .invalid so).
    with pytest.raises(ConfigError, match=r"`server\.host`: cannot resolve"):
        config.load(write(tmp_path, "[server]\nhost = '127.example.invalid'\n" + GOOD))
    local = config.load(write(tmp_path, "[server]\nhost = 'localhost'\n" + GOOD))
    assert local.listen_addresses and config.is_loopback(local.listen_addresses)
    assert not config.is_loopback(["127.0.0.1", "10.1.2.3"])
    assert not config.is_loopback(config.resolve_host("0.0.0.0"))
