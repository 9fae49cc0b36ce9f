"""The engine interface under its old names (engines/errors.py, job.py and worker.py hold it)."""

from __future__ import annotations

from sidecar.engines.errors import (
    ContextLengthExceeded,
    EngineBusy,
    EngineFailure,
    EngineNotReady,
    EngineUnusable,
)
from sidecar.engines.job import Delta, Job, Params, State, Stats
from sidecar.engines.worker import DROPPED, STARTED, Event, ThreadedEngine

__all__ = [
    "DROPPED", "STARTED", "ContextLengthExceeded", "Delta", "EngineBusy", "EngineFailure",
    "EngineNotReady", "EngineUnusable", "Event", "Job", "Params", "State", "Stats",
    "ThreadedEngine",
]
