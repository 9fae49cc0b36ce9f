"""Which engine serves a local provider, decided once at start-up."""

from __future__ import annotations

import importlib.util
from typing import Any

from sidecar.engines import exllamav2, models, transformers
from sidecar.engines.errors import EngineUnusable
from sidecar.engines.worker import ThreadedEngine
from sidecar.settings import LocalProviderSettings


def make_engine(settings: LocalProviderSettings) -> ThreadedEngine:
    """The engine for `settings`, checked to be usable on this machine (blocking: imports
    torch). Raises EngineUnusable with one sentence when it is not."""
    kind = settings.engine
    if kind == "auto":
        kind = "exllamav2" if _gpu_engine_usable() else "transformers"
    models.check(settings.model)
    common: dict[str, Any] = {
        "max_batch_size": settings.max_batch_size, "max_queue": settings.max_queue,
        "max_seq_len": settings.max_seq_len, "stall_s": settings.stall_s,
        "load_wait_s": settings.load_wait_s,
    }
    if kind == "exllamav2":
        exllamav2.check_available()
        return exllamav2.ExLlamaV2Engine(cache_type=settings.cache, **common)
    transformers.check_available()
    return transformers.TransformersEngine(idle_priority=settings.idle_priority,
                                           dtype=settings.dtype, **common)


def _gpu_engine_usable() -> bool:
    if importlib.util.find_spec("exllamav2") is None or importlib.util.find_spec("torch") is None:
        return False
    try:
        exllamav2.check_available()
    except EngineUnusable:
        return False
    return True
