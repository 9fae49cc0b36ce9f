"""One generation and its values: the sampling parameters it runs with, the deltas it yields,
the engine's state and counters.

A job is fed by the engine's worker (through the event loop, see engines/worker.py) and read by
the request that submitted it; the queue between them is the job's own.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from sidecar.errors import SidecarError


class State(enum.StrEnum):
    EMPTY = "empty"  # nothing loaded (never loaded, unloaded, or the last load failed)
    LOADING = "loading"
    READY = "ready"


@dataclass(frozen=True, slots=True)
class Params:
    """Sampling parameters with OpenAI's meaning and defaults."""

    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(slots=True)
class Delta:
    """New text of one job; the last one of a job has a finish_reason."""

    text: str
    completion_tokens: int  # tokens generated so far
    finish_reason: str | None = None  # "stop" | "length"
    new_tokens: int = 1  # tokens this delta accounts for


def _nothing() -> None:
    pass


class Job:
    """One generation: the worker thread feeds it, the event loop reads it."""

    __slots__ = ("_items", "_wake", "cancelled", "done", "native", "params", "prompt_ids",
                 "started")

    def __init__(self, prompt_ids: list[int], params: Params,
                 wake: Callable[[], None] = _nothing) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self._wake = wake  # tells the worker to look at its jobs (a cancel must not wait)
        self._items: asyncio.Queue[Delta | SidecarError | None] = asyncio.Queue()
        # Written by the loop, read by the worker between two tokens.
        self.cancelled = False
        self.started = False
        self.done = False
        self.native: Any = None  # the engine's own state for this job (worker thread only)

    def cancel(self) -> None:
        """Stop generating: the worker drops the job before its next token."""
        if not self.done:
            self.cancelled = True
            self._wake()

    # -- the engine's side (on the event loop) -----------------------------------------

    def put(self, item: Delta | SidecarError) -> None:
        """Hand a delta or the error that ends the job to its reader."""
        self._items.put_nowait(item)

    def end(self) -> None:
        """End the reader's stream without a finish reason (the job was dropped)."""
        self._items.put_nowait(None)

    # -- the reader's side -------------------------------------------------------------

    async def deltas(self, heartbeat_s: float | None = None
                     ) -> AsyncGenerator[Delta | None, None]:
        """The job's deltas as they come; None after `heartbeat_s` of silence."""
        get = self._items.get
        while True:
            if heartbeat_s is None:
                item = await get()
            else:
                try:
                    async with asyncio.timeout(heartbeat_s):
                        item = await get()
                except TimeoutError:
                    yield None
                    continue
            if item is None:
                return
            if isinstance(item, SidecarError):
                raise item
            yield item
            if item.finish_reason is not None:
                return


@dataclass(slots=True)
class Stats:
    queued: int = 0
    active: int = 0
    completed: int = 0
    failed: int = 0
    tokens: int = 0
    # (time, tokens) per worker step over the last few seconds, for tokens/s.
    recent: collections.deque[tuple[float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=4096))
    last_progress: float = 0.0

    def tokens_per_s(self, window: float = 10.0) -> float:
        now = time.monotonic()
        total = sum(n for t, n in self.recent if now - t <= window)
        oldest = next((t for t, _ in self.recent if now - t <= window), None)
        if oldest is None or total == 0:
            return 0.0
        return total / max(now - oldest, 1.0)
