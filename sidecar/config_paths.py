"""Relative paths in a config file are relative to the file's own directory, not to the
directory the process happened to start in: a config and the key, certificate and model files
beside it move together. Only paths written in the file are resolved; a default (such as
routing.state_file's) stays relative to the working directory, which the unit sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# (table, key) of every path a config can name, outside [providers.NAME].
_PATHS = (
    ("server", "tls_cert"), ("server", "tls_key"), ("server", "tls_client_ca"),
    ("auth", "public_key_file"), ("auth", "jwks_file"),
    ("routing", "state_file"),
)
# Of a local provider's model: the names that are not directories.
_NOT_A_PATH = ("builtin:",)


def resolve_relative(data: dict[str, Any], base: Path) -> None:
    """Rewrite, in the raw TOML mapping `data`, each relative path to one under `base`."""
    for table, key in _PATHS:
        section = data.get(table)
        if isinstance(section, dict):
            _resolve(section, key, base)
    providers = data.get("providers")
    if not isinstance(providers, dict):
        return
    for provider in providers.values():
        if not isinstance(provider, dict):
            continue  # the type check that follows names the entry
        _resolve(provider, "api_key_file", base)
        model = provider.get("model")
        if provider.get("kind") == "local" and isinstance(model, str) \
                and not model.startswith(_NOT_A_PATH):
            _resolve(provider, "model", base)


def _resolve(section: dict[str, Any], key: str, base: Path) -> None:
    value = section.get(key)
    if isinstance(value, str) and value and not Path(value).is_absolute():
        section[key] = str(base / value)
