"""A stand-in for ExLlamaV2's dynamic generator, for a machine without a GPU.

It follows the library's documented shapes (exllamav2/generator/dynamic.py, 0.3.2):
`ExLlamaV2DynamicJob(input_ids=(1, n) tensor, max_new_tokens, gen_settings, seed,
stop_conditions=[token ids and strings], decode_special_tokens, identifier)`, and
`generator.iterate()` returning dicts with "stage" ("started", "prefill", "streaming"),
"identifier", "eos", "text", "token_ids" ((1, k) tensor), and at the end "eos_reason"
("stop_token" | "stop_string" | "max_new_tokens") and "new_tokens". Its "model" writes the
words of a fixed script, one token each. Only the engine's own logic is under test with it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from sidecar.engines.exllamav2 import Runtime
from sidecar.engines.prompt import Prompting

SCRIPT = ["Hello", " there", ",", " friend", ".", " How", " are", " you", " today", "?"]
EOS = 2
GPU_BYTES = 300 * 1024 * 1024  # what the stand-in says its load took on the GPU


class Shape:
    """What a tensor's .shape gives."""

    def __init__(self, *dims: int) -> None:
        self.shape = dims


class Settings:
    """ExLlamaV2Sampler.Settings with the library's defaults, which the engine must undo."""

    def __init__(self) -> None:
        self.token_repetition_penalty = 1.025
        self.token_presence_penalty = 0.0
        self.token_frequency_penalty = 0.0
        self.temperature = 0.8
        self.top_k = 50
        self.top_p = 0.8
        self.min_p = 0.0
        self.top_a = 0.0
        self.tfs = 0.0
        self.typical = 0.0
        self.smoothing_factor = 0.0
        self.dry_multiplier = 0.0
        self.xtc_probability = 0.0
        self.mirostat = False


class Job:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.identifier = kwargs["identifier"]
        self.max_new_tokens: int = kwargs["max_new_tokens"]
        self.stop_conditions: list[Any] = kwargs["stop_conditions"]
        self.generated = 0
        self.text = ""
        self.started = False
        # A stop token after this many words, when a test asks for one.
        self.eos_after: int | None = None


class Generator:
    def __init__(self) -> None:
        self.pending: list[Job] = []
        self.active: list[Job] = []
        self.jobs: list[Job] = []  # every job ever enqueued
        self.cancelled: list[Job] = []
        self.fail_next = 0  # iterate() raises this many times
        self.cleared = 0
        self.iterations = 0
        self.eos_after: int | None = None
        self.gate = threading.Event()  # iterate() waits on this while it is clear
        self.gate.set()
        self.threads: set[str] = set()
        self.step_s = 0.0  # how long a step takes (a real one is a forward pass)

    def enqueue(self, job: Job) -> int:
        job.eos_after = self.eos_after
        self.pending.append(job)
        self.jobs.append(job)
        return len(self.jobs)

    def cancel(self, job: Job) -> None:
        self.cancelled.append(job)
        for queue in (self.pending, self.active):
            if job in queue:
                queue.remove(job)

    def clear_queue(self) -> None:
        self.cleared += 1
        self.pending.clear()
        self.active.clear()

    def num_remaining_jobs(self) -> int:
        return len(self.pending) + len(self.active)

    def iterate(self) -> list[dict[str, Any]]:
        self.threads.add(threading.current_thread().name)
        self.gate.wait(5)
        if self.step_s:
            time.sleep(self.step_s)
        self.iterations += 1
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        results: list[dict[str, Any]] = []
        for job in self.pending:
            results.append({"job": job, "stage": "started", "identifier": job.identifier,
                            "serial": 0, "eos": False})
            self.active.append(job)
        self.pending.clear()
        for job in list(self.active):
            results.append(self._token(job))
        return results

    def _token(self, job: Job) -> dict[str, Any]:
        word = SCRIPT[job.generated % len(SCRIPT)]
        job.generated += 1
        result: dict[str, Any] = {"job": job, "stage": "streaming", "identifier": job.identifier,
                                  "serial": 0, "eos": False, "text": word,
                                  "token_ids": Shape(1, 1)}
        strings = [s for s in job.stop_conditions if isinstance(s, str)]
        candidate = job.text + word
        hit = next((s for s in strings if s in candidate), None)
        if job.eos_after is not None and job.generated > job.eos_after:
            result.update(eos=True, eos_reason="stop_token", text="",
                          eos_triggering_token_id=EOS)
        elif hit is not None:
            result.update(eos=True, eos_reason="stop_string",
                          text=candidate[:candidate.index(hit)][len(job.text):])
        elif job.generated >= job.max_new_tokens:
            result.update(eos=True, eos_reason="max_new_tokens")
        job.text += result["text"]
        if result["eos"]:
            result["new_tokens"] = job.generated
            result["full_completion"] = job.text
            self.active.remove(job)
        return result


def standin_loader(generator: Generator, model_dir: Path) -> Any:
    """A loader for ExLlamaV2Engine(loader=...) that returns the stand-in generator over a
    real tokenizer.json and chat template."""

    def load(path: Path, max_seq_len: int, max_batch_size: int, cache_type: str) -> Runtime:
        return Runtime(
            generator=generator, new_job=Job, new_settings=Settings,
            input_ids=lambda ids: Shape(1, len(ids)), prompting=Prompting(model_dir),
            eos_ids=frozenset({EOS}), vocab_size=49152, max_seq_len=max_seq_len,
            max_batch_size=max_batch_size, paged=True, gpu_bytes=GPU_BYTES,
        )

    return load
