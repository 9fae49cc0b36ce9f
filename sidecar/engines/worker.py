"""The thread that owns a model, and the queue in front of it.

An engine takes a tokenized prompt and sampling parameters and gives back an async stream of
text deltas. The model belongs to one worker thread: the event loop only puts jobs on a queue
and receives what the thread hands back with `call_soon_threadsafe`, so it never waits behind
a forward pass. Subclasses say how to load, start, step and drop jobs; the hand-off, the queue
limit, cancellation, recovery after a failure and the numbers the admin API shows live here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

from sidecar.engines.errors import ContextLengthExceeded, EngineBusy, EngineFailure, EngineNotReady
from sidecar.engines.job import Delta, Job, Params, State, Stats
from sidecar.engines.prompt import Prompting
from sidecar.errors import SidecarError

log = logging.getLogger("sidecar.engine")

# What the worker hands back: (job, what happened) with one of these or a Delta / error.
STARTED = "started"
DROPPED = "dropped"
Event = tuple[Job, Delta | SidecarError | str]


class ThreadedEngine:
    """The worker thread, the queue in front of it, and the model's lifecycle.

    Subclasses implement the `_`-prefixed hooks; all of them but `_load` and `_unload` run on
    the worker thread, which is the only thread that touches the model.
    """

    kind = "engine"

    def __init__(self, *, max_batch_size: int, max_queue: int, max_seq_len: int,
                 stall_s: float, load_wait_s: float) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_seq_len = max_seq_len
        self.stall_s = stall_s
        self.load_wait_s = load_wait_s
        self.state = State.EMPTY
        self.vocab_size = 0  # set by a load
        self.model_name = ""
        self.load_error = ""
        self.loaded_at = 0.0
        self.stats = Stats()
        # The loaded model's template and tokenizer, used on the event loop; set by a load.
        self.prompting: Prompting | None = None
        self._ready = asyncio.Event()
        self._switch = asyncio.Lock()
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: set[Job] = set()

    # -- the loop's side ---------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    def hung(self) -> bool:
        """Jobs are active, yet no token came for stall_s: not healthy, whatever it says."""
        stats = self.stats
        return stats.active > 0 and time.monotonic() - stats.last_progress > self.stall_s

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (special tokens in the text are honoured)."""
        return self._prompting().encode(text)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return self._prompting().render_chat(messages)

    def _prompting(self) -> Prompting:
        prompting = self.prompting
        if prompting is None:
            raise EngineNotReady("No local model is loaded.", headers={"Retry-After": "5"})
        return prompting

    async def submit(self, prompt_ids: list[int], params: Params, *, wait: bool) -> Job:
        """Queue a generation. Refuses at once what cannot run: a prompt too long for the
        model, a full queue, no model (after waiting up to load_wait_s for one being loaded,
        when `wait`)."""
        if self.state is not State.READY:
            await self.ensure_ready(wait)
        room = self.max_seq_len - len(prompt_ids)
        if room <= 0 or params.max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, "
                f"you requested {len(prompt_ids) + params.max_tokens} tokens "
                f"({len(prompt_ids)} in the messages, {params.max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="messages",
            )
        stats = self.stats
        # Jobs the worker has not started yet count against max_queue once the running ones
        # fill every slot.
        if stats.queued >= self.max_queue + max(0, self.max_batch_size - stats.active):
            raise EngineBusy(
                f"The local engine is full: {stats.active} requests running, {stats.queued} "
                "waiting (max_queue); try again shortly.",
                headers={"Retry-After": "1"},
            )
        job = Job(prompt_ids, params, self.wake)
        self._jobs.add(job)
        self.stats.queued += 1
        self._inbox.put(job)
        return job

    def wake(self) -> None:
        # A None wakes a worker that sleeps on an empty inbox; it then looks at its jobs.
        self._inbox.put(None)

    async def ensure_ready(self, wait: bool) -> None:
        """Return once a model is loaded; raise EngineNotReady if none is (after waiting up
        to load_wait_s for one being loaded, when `wait`)."""
        if self.state is State.LOADING and wait:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.load_wait_s):
                    await self._ready.wait()
        if self.state is State.READY:
            return
        if self.state is State.LOADING:
            raise EngineNotReady(f"The local model {self.model_name} is loading; try again "
                                 "shortly.", headers={"Retry-After": "5"})
        why = f": the last load failed ({self.load_error})" if self.load_error else ""
        raise EngineNotReady(f"No local model is loaded{why}.", headers={"Retry-After": "30"})

    def _deliver(self, events: list[Event]) -> None:
        """Runs on the loop: pass each event to its job and keep the counters."""
        stats = self.stats
        for job, what in events:
            if job.done:
                continue
            if what is STARTED:
                job.started = True
                stats.queued -= 1
                stats.active += 1
                continue
            if what is DROPPED or isinstance(what, SidecarError) or (
                    isinstance(what, Delta) and what.finish_reason is not None):
                if job.started:
                    stats.active -= 1
                else:
                    stats.queued -= 1
                job.done = True
                self._jobs.discard(job)
                if isinstance(what, SidecarError):
                    stats.failed += 1
                elif what is not DROPPED:
                    stats.completed += 1
            if what is DROPPED:
                job.end()
            else:
                assert not isinstance(what, str)
                job.put(what)

    # -- lifecycle ---------------------------------------------------------------------

    async def load(self, model: str) -> None:
        """Load `model` (replacing what is loaded) in a thread; the worker starts after."""
        async with self._switch:
            await self._stop_worker(f"the local model is being replaced by {model}")
            self.state = State.LOADING
            self.model_name = model
            self.load_error = ""
            self._ready.clear()
            started = time.monotonic()
            try:
                await asyncio.to_thread(self._load, model)
            except Exception as exc:
                self.state = State.EMPTY
                self.load_error = str(exc) or type(exc).__name__
                log.error("local model failed to load", extra={"fields": {
                    "model": model, "engine": self.kind, "error": self.load_error}})
                raise
            self.loaded_at = time.time()
            self._start_worker()
            self.state = State.READY
            self._ready.set()
            log.info("local model loaded", extra={"fields": {
                "model": model, "engine": self.kind,
                "seconds": round(time.monotonic() - started, 3)}})

    async def unload(self) -> None:
        async with self._switch:
            await self._stop_worker("the local model was unloaded")
            self.state = State.EMPTY
            self._ready.clear()
            await asyncio.to_thread(self._unload)
            log.info("local model unloaded", extra={"fields": {"model": self.model_name}})

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.unload()

    def _start_worker(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._inbox = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"{self.kind}-worker",
                                        daemon=True)
        self._thread.start()

    async def _stop_worker(self, reason: str) -> None:
        """Fail what is queued or running with `reason`, and end the worker thread."""
        thread = self._thread
        if thread is None:
            return
        self.state = State.LOADING
        for job in list(self._jobs):
            job.cancelled = True
        self._stopping = True
        self._inbox.put(None)
        self._thread = None
        # A worker stuck inside the library (a hung GPU) is left behind, not waited for.
        await asyncio.to_thread(thread.join, self.stall_s)
        if thread.is_alive():
            log.error("local engine worker did not stop; leaving it behind",
                      extra={"fields": {"engine": self.kind, "waited_s": self.stall_s}})
        error = EngineNotReady(f"The request was stopped: {reason}.",
                               headers={"Retry-After": "5"})
        self._deliver([(job, error) for job in list(self._jobs)])

    # -- the worker thread -------------------------------------------------------------

    _stopping = False

    def _run(self) -> None:
        self._worker_started()
        waiting: collections.deque[Job] = collections.deque()
        active: list[Job] = []
        inbox = self._inbox
        while True:
            # Sleep only when there is nothing to do; otherwise look at the inbox in passing.
            block = not active and not waiting
            try:
                item = inbox.get(block=block)
                while True:
                    if item is not None:
                        waiting.append(item)
                    item = inbox.get_nowait()
            except queue.Empty:
                pass
            if self._stopping:
                for job in active:
                    self._safe_drop(job)
                return
            events: list[Event] = []
            # Cancelled jobs leave before the next token.
            for job in [j for j in active if j.cancelled]:
                active.remove(job)
                self._safe_drop(job)
                events.append((job, DROPPED))
            for job in [j for j in waiting if j.cancelled]:
                waiting.remove(job)
                events.append((job, DROPPED))
            if waiting and len(active) < self.max_batch_size:
                # Progress starts now: an engine idle for an hour is not hung the moment a
                # job arrives.
                self.stats.last_progress = time.monotonic()
            while waiting and len(active) < self.max_batch_size:
                job = waiting.popleft()
                try:
                    self._start(job)
                except Exception as exc:
                    log.exception("local job could not start")
                    events.append((job, EngineFailure(f"The local engine could not start the "
                                                      f"request: {exc}")))
                    continue
                active.append(job)
                events.append((job, STARTED))
            if events:  # at once: the counters the queue limit reads must not lag a step
                self._hand_back(events)
                events = []
            if active:
                produced: list[tuple[Job, Delta | SidecarError]]
                try:
                    produced = list(self._step(active))
                except Exception as exc:  # noqa: BLE001 - any failure fails its jobs, not the thread
                    produced = self._recover(active, exc)
                tokens = 0
                for job, delta in produced:
                    events.append((job, delta))
                    if isinstance(delta, Delta):
                        tokens += delta.new_tokens
                        if delta.finish_reason is not None:
                            active.remove(job)
                    else:
                        active.remove(job)
                now = time.monotonic()
                self.stats.last_progress = now
                if tokens:
                    self.stats.tokens += tokens
                    self.stats.recent.append((now, tokens))
            if events:
                self._hand_back(events)

    def _recover(self, active: list[Job], exc: Exception) -> list[tuple[Job, Delta | SidecarError]]:
        log.error("local engine failed; failing its jobs and recovering",
                  extra={"fields": {"error": f"{type(exc).__name__}: {exc}",
                                    "jobs": len(active)}})
        error = EngineFailure(f"The local engine failed while generating: "
                              f"{type(exc).__name__}: {exc}")
        failed: list[tuple[Job, Delta | SidecarError]] = [(job, error) for job in active]
        try:
            self._reset(list(active))
        except Exception:
            log.exception("local engine reset failed")
        return failed

    def _safe_drop(self, job: Job) -> None:
        try:
            self._drop(job)
        except Exception:
            log.exception("dropping a local job failed")

    def _hand_back(self, events: list[Event]) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us at shutdown
            loop.call_soon_threadsafe(self._deliver, events)

    # -- hooks -------------------------------------------------------------------------

    def _load(self, model: str) -> None:
        """Load weights, tokenizer and template (runs in a thread, not the worker)."""
        raise NotImplementedError

    def _unload(self) -> None:
        raise NotImplementedError

    def _start(self, job: Job) -> None:
        """Begin a job (prefill, or hand it to the generator)."""
        raise NotImplementedError

    def _step(self, active: list[Job]) -> Iterable[tuple[Job, Delta]]:
        """Advance the active jobs by about one token each; yields their new deltas."""
        raise NotImplementedError

    def _worker_started(self) -> None:
        """Runs first on the worker thread."""

    def _drop(self, job: Job) -> None:
        """Forget a job that was cancelled (free its cache)."""

    def _reset(self, jobs: list[Job]) -> None:
        """Bring the generator back to a clean state after a failure that held `jobs`."""
        for job in jobs:
            self._safe_drop(job)

    def describe(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "engine": self.kind,
            "model": self.model_name,
            "state": self.state.value,
            "load_error": self.load_error or None,
            "loaded_at": int(self.loaded_at) if self.loaded_at else None,
            "queue_depth": stats.queued,
            "active_jobs": stats.active,
            "completed": stats.completed,
            "failed": stats.failed,
            "tokens_generated": stats.tokens,
            "tokens_per_s": round(stats.tokens_per_s(), 2),
            "hung": self.hung(),
            "max_batch_size": self.max_batch_size,
            "max_queue": self.max_queue,
            "max_seq_len": self.max_seq_len,
        }
