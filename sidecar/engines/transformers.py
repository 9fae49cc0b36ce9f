"""The CPU engine: a transformers causal LM, driven token by token on the worker thread.

A job is prefilled on its own, then joins the batch of sequences being generated: every step
is one forward pass for all of them (engines/batch.py), so concurrent requests share the cost
of reading the weights.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.engines import models
from sidecar.engines.batch import KVBatch, output_cache
from sidecar.engines.errors import EngineNotReady, EngineUnusable
from sidecar.engines.hf import quiet_transformers
from sidecar.engines.job import Delta, Job
from sidecar.engines.prompt import Prompting, eos_ids
from sidecar.engines.sampling import next_token
from sidecar.engines.text import Detokenizer
from sidecar.engines.worker import ThreadedEngine

log = logging.getLogger("sidecar.engine")


def check_available() -> None:
    try:
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise EngineUnusable(
            f'engine "transformers" needs torch, transformers and tokenizers ({exc.name} is not '
            "installed): pip install 'llm-sidecar[cpu]'"
        ) from None


@dataclass(slots=True)
class _Loaded:
    model: Any
    decode: Callable[[Sequence[int]], str]  # ids -> text, without special tokens
    eos_ids: frozenset[int]
    vocab_size: int
    cache_arg: str  # "cache" in newer transformers, "past_key_values" before

    def prefill(self, prompt_ids: list[int]) -> tuple[Any, Any]:
        """One prompt's forward pass: the logits of its next token and its KV cache."""
        import torch

        out = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True,
                         logits_to_keep=1)
        return out.logits[0, -1], output_cache(out)


class _Sequence:
    """A job's state on the worker: its tokens, its sampler, its text so far."""

    __slots__ = ("counts", "detok", "generated", "generator", "pending")

    def __init__(self, pending: int, generator: Any, counts: Any, detok: Detokenizer) -> None:
        self.pending = pending  # sampled, not yet emitted nor fed back
        self.generated: list[int] = []
        self.generator = generator
        self.counts = counts
        self.detok = detok


class TransformersEngine(ThreadedEngine):
    kind = "transformers"

    def __init__(self, *, idle_priority: bool = True, dtype: str = "auto",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.idle_priority = idle_priority
        self.dtype = dtype
        self._loaded: _Loaded | None = None
        self._batch = KVBatch()  # worker thread only
        self._configured_seq_len = self.max_seq_len
        self._configured_batch = self.max_batch_size
        self.weights_bytes = 0  # the loaded model's parameters, as held in memory

    # -- loading (in a thread) ---------------------------------------------------------

    def _load(self, model: str) -> None:
        check_available()
        import torch
        from transformers import AutoModelForCausalLM

        quiet_transformers()
        # Matrix kernels on every core but one: the event loop keeps a core to itself, which
        # kept proxied requests' latency beside generation here (float32 ran 56 ms a token
        # with one thread or two; bfloat16 does gain from a second one, 33 against 49 ms).
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
        path = models.resolve(model)
        if self.dtype == "auto":
            self.dtype = "bfloat16" if native_bf16() else "float32"
        network = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, self.dtype), local_files_only=True)
        network.eval()  # type: ignore[no-untyped-call]
        self.weights_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
        config = network.config
        limit = getattr(config, "max_position_embeddings", None) or self._configured_seq_len
        self.max_seq_len = min(self._configured_seq_len, int(limit))
        self.vocab_size = int(config.vocab_size)
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"} or getattr(config, "sliding_window", None):
            # The batch rebuilds caches as plain full-attention ones: a model with sliding
            # windows (or other layer kinds) keeps its own cache and runs one sequence at a
            # time.
            log.warning("local model generates one sequence at a time", extra={"fields": {
                "model": model, "layer_types": sorted(layer_types),
                "sliding_window": getattr(config, "sliding_window", None)}})
            self.max_batch_size = 1
        else:
            self.max_batch_size = self._configured_batch
        names = inspect.signature(network.forward).parameters
        self.prompting = prompting = Prompting(path)
        self._loaded = _Loaded(
            model=network,
            decode=prompting.decode,
            eos_ids=eos_ids(path, getattr(config, "eos_token_id", None)),
            vocab_size=int(config.vocab_size),
            cache_arg="cache" if "cache" in names else "past_key_values",
        )

    def _unload(self) -> None:
        self.weights_bytes = 0
        self._loaded = None
        self.prompting = None
        self._batch = KVBatch()

    def _worker_started(self) -> None:
        if not self.idle_priority:
            return
        # Generation is batch work: on a core it shares with the event loop, the loop runs
        # first (SCHED_IDLE on this thread only), so proxied requests keep their latency
        # while the CPU model generates.
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dtype": self.dtype, "weights_bytes": self.weights_bytes}

    # -- the loop's side ---------------------------------------------------------------

    def _require(self) -> _Loaded:
        loaded = self._loaded
        if loaded is None:
            raise EngineNotReady("No local model is loaded.", headers={"Retry-After": "5"})
        return loaded

    # -- the worker's side -------------------------------------------------------------

    def _start(self, job: Job) -> None:
        import torch

        loaded = self._require()
        params = job.params
        generator = torch.Generator()
        # Any integer a client sends is a seed; torch takes 64 bits.
        generator.manual_seed(params.seed % 2**63 if params.seed is not None
                              else secrets.randbits(63))
        counts = None
        if params.presence_penalty or params.frequency_penalty:
            counts = torch.zeros(loaded.vocab_size)
        with torch.inference_mode():
            logits, cache = loaded.prefill(job.prompt_ids)
            token = next_token(logits, params, counts, generator)
        job.native = _Sequence(token, generator, counts, Detokenizer(loaded.decode, params.stop))
        self._batch.add(job, cache)

    def _step(self, active: list[Job]) -> list[tuple[Job, Delta]]:
        import torch

        loaded = self._require()
        batch = self._batch
        produced: list[tuple[Job, Delta]] = []
        finished = []
        for job in batch.rows:
            delta = self._emit(job, loaded)
            produced.append((job, delta))
            if delta.finish_reason is not None:
                finished.append(job)
        batch.remove(finished)
        for job in finished:
            job.native = None
        if batch.rows:
            with torch.inference_mode():
                logits = batch.forward(loaded.model, loaded.cache_arg,
                                       [job.native.pending for job in batch.rows])
                for row, job in enumerate(batch.rows):
                    seq: _Sequence = job.native
                    seq.pending = next_token(logits[row], job.params, seq.counts,
                                             seq.generator)
        return produced

    def _emit(self, job: Job, loaded: _Loaded) -> Delta:
        """The text the job's pending token adds, and whether the job ends with it."""
        seq: _Sequence = job.native
        token = seq.pending
        seq.generated.append(token)
        count = len(seq.generated)
        if token in loaded.eos_ids:
            seq.generated.pop()  # the end-of-turn token is not text
            seq.detok.push(seq.generated)
            return Delta(seq.detok.flush(), count, "stop")
        text, stopped = seq.detok.push(seq.generated)
        if stopped:
            return Delta(text, count, "stop")
        if count >= job.params.max_tokens:
            return Delta(text + seq.detok.flush(), count, "length")
        if seq.counts is not None:
            seq.counts[token] += 1
        return Delta(text, count)

    def _drop(self, job: Job) -> None:
        self._batch.remove([job])
        job.native = None

    def _reset(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.native = None
        self._batch = KVBatch()

    def generate_direct(self, prompt_ids: list[int], params: Any) -> tuple[str, int]:
        """The same generation code without the queue, the thread hand-off or HTTP: what a
        benchmark compares the sidecar against. Blocking; call it while no request runs."""
        job = Job(prompt_ids, params)
        shared, self._batch = self._batch, KVBatch()
        try:
            self._start(job)
            pieces = []
            while True:
                [(_, delta)] = self._step([job])
                pieces.append(delta.text)
                if delta.finish_reason is not None:
                    return "".join(pieces), delta.completion_tokens
        finally:
            self._batch = shared


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (else float32 is the faster choice)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False

