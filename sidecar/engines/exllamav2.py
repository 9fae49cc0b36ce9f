"""The GPU engine: ExLlamaV2's dynamic generator, owned by the worker thread.

Continuous batching is the generator's: jobs are enqueued as they arrive and `iterate()`
advances all of them by a token. With flash-attn >= 2.5.7 the generator pages its cache and
batches up to max_batch_size sequences; without it, it runs unpaged, one sequence at a time.

The package is imported only when this engine is chosen. What the engine needs from it is
gathered in a `Runtime`, so the job and result handling can be exercised on a machine without
a GPU by a stand-in runtime that follows the library's documented shapes.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sidecar.engines import models
from sidecar.engines.errors import EngineNotReady, EngineUnusable
from sidecar.engines.job import Delta, Job, Params
from sidecar.engines.prompt import Prompting, eos_ids
from sidecar.engines.worker import ThreadedEngine

log = logging.getLogger("sidecar.engine")

CacheType = Literal["fp16", "q8", "q6", "q4"]


@dataclass(slots=True)
class Runtime:
    """A loaded model: the generator and the library's types the engine uses."""

    generator: Any  # ExLlamaV2DynamicGenerator: enqueue, iterate, cancel, clear_queue
    new_job: Callable[..., Any]  # ExLlamaV2DynamicJob
    new_settings: Callable[[], Any]  # ExLlamaV2Sampler.Settings
    input_ids: Callable[[list[int]], Any]  # ids -> a (1, n) tensor
    prompting: Prompting
    eos_ids: frozenset[int]
    vocab_size: int
    max_seq_len: int
    max_batch_size: int
    paged: bool
    gpu_bytes: int = 0  # GPU memory the load took: weights, cache and the warm-up's buffers


Loader = Callable[[Path, int, int, CacheType], Runtime]


def check_available() -> None:
    """Raise EngineUnusable with one sentence when this machine cannot run the engine."""
    try:
        import torch
    except ImportError:
        raise EngineUnusable(
            'engine "exllamav2" needs torch built with CUDA, and torch is not installed: '
            "pip install 'llm-sidecar[gpu]'"
        ) from None
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}"
        raise EngineUnusable(
            f'engine "exllamav2" needs a CUDA GPU, and {build} sees none '
            "(torch.cuda.is_available() is False); use engine = \"transformers\" or \"auto\""
        )
    if importlib.util.find_spec("exllamav2") is None:
        raise EngineUnusable(
            'engine "exllamav2" needs the package exllamav2, which is not installed: '
            "pip install 'llm-sidecar[gpu]'"
        )
    try:
        import exllamav2.ext  # noqa: F401  (loads, or builds, the CUDA extension)
    except Exception as exc:  # noqa: BLE001 - whatever the build says, in one sentence
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EngineUnusable(
            f'engine "exllamav2": the package is installed but its CUDA extension cannot be '
            f"loaded or built ({first}); it needs nvcc and ninja matching torch's CUDA "
            f"{torch.version.cuda}"
        ) from None


def load_runtime(path: Path, max_seq_len: int, max_batch_size: int,
                 cache_type: CacheType) -> Runtime:
    """Load a model directory (EXL2, or FP16/BF16 safetensors) across the visible GPUs."""
    import torch
    from exllamav2 import (
        ExLlamaV2,
        ExLlamaV2Cache,
        ExLlamaV2Cache_Q4,
        ExLlamaV2Cache_Q6,
        ExLlamaV2Cache_Q8,
        ExLlamaV2Config,
        ExLlamaV2Tokenizer,
    )
    from exllamav2.attn import has_flash_attn_with_paged
    from exllamav2.generator import (
        ExLlamaV2DynamicGenerator,
        ExLlamaV2DynamicJob,
        ExLlamaV2Sampler,
    )

    config = ExLlamaV2Config(str(path))
    config.max_seq_len = min(max_seq_len, config.max_seq_len)
    paged = bool(has_flash_attn_with_paged)
    if not paged:
        log.warning("flash-attn >= 2.5.7 is not importable: the generator runs unpaged, one "
                    "sequence at a time (max_batch_size 1)")
        max_batch_size = 1
    cache_class = {"fp16": ExLlamaV2Cache, "q8": ExLlamaV2Cache_Q8, "q6": ExLlamaV2Cache_Q6,
                   "q4": ExLlamaV2Cache_Q4}[cache_type]
    before = sum(torch.cuda.memory_allocated(d) for d in range(torch.cuda.device_count()))
    model = ExLlamaV2(config)
    # One cache shared by every sequence: room for max_batch_size full-length ones.
    cache = cache_class(model, max_seq_len=config.max_seq_len * max_batch_size, lazy=True)
    model.load_autosplit(cache, progress=False)
    tokenizer = ExLlamaV2Tokenizer(config)
    generator = ExLlamaV2DynamicGenerator(
        model=model, cache=cache, tokenizer=tokenizer, max_batch_size=max_batch_size,
        max_seq_len=config.max_seq_len, paged=paged,
    )
    generator.warmup()
    return Runtime(
        generator=generator,
        new_job=ExLlamaV2DynamicJob,
        new_settings=ExLlamaV2Sampler.Settings,
        input_ids=lambda ids: torch.tensor([ids], dtype=torch.long),
        prompting=Prompting(path),
        eos_ids=eos_ids(path, tokenizer.eos_token_id),
        vocab_size=int(config.vocab_size),
        max_seq_len=config.max_seq_len,
        max_batch_size=max_batch_size,
        paged=paged,
        gpu_bytes=sum(torch.cuda.memory_allocated(d) for d in range(torch.cuda.device_count()))
        - before,
    )


def sampler_settings(settings: Any, params: Params) -> Any:
    """OpenAI's parameters on ExLlamaV2's sampler, with the library's own defaults
    (repetition penalty 1.025, top-k 50, top-p 0.8, temperature 0.8) neutralised, so a
    request means the same here as on any other backend."""
    settings.token_repetition_penalty = 1.0
    settings.token_presence_penalty = params.presence_penalty
    settings.token_frequency_penalty = params.frequency_penalty
    settings.min_p = 0.0
    settings.top_a = 0.0
    settings.tfs = 0.0
    settings.typical = 0.0
    settings.smoothing_factor = 0.0
    settings.dry_multiplier = 0.0
    settings.xtc_probability = 0.0
    settings.mirostat = False
    if params.temperature == 0:  # greedy, as the library's own Settings.greedy() does it
        settings.temperature = 1.0
        settings.top_k = 1
        settings.top_p = 0.0
    else:
        settings.temperature = params.temperature
        # top_p 0 keeps only the best token (as on the CPU engine); the library reads 0 as off.
        settings.top_k = 1 if params.top_p == 0 else params.top_k  # 0: off
        settings.top_p = params.top_p if 0 < params.top_p < 1.0 else 0.0  # 0: off
    return settings


class _Native:
    __slots__ = ("job", "tokens")

    def __init__(self, job: Any) -> None:
        self.job = job
        self.tokens = 0


class ExLlamaV2Engine(ThreadedEngine):
    kind = "exllamav2"

    def __init__(self, *, cache_type: CacheType = "fp16", loader: Loader | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cache_type = cache_type
        self._loader = loader
        self._configured = (self.max_seq_len, self.max_batch_size)
        self._runtime: Runtime | None = None

    def _load(self, model: str) -> None:
        loader = self._loader
        if loader is None:
            check_available()
            loader = load_runtime
        seq_len, batch = self._configured
        runtime = loader(models.resolve(model), seq_len, batch, self.cache_type)
        self.max_seq_len = runtime.max_seq_len
        self.max_batch_size = runtime.max_batch_size
        self.vocab_size = runtime.vocab_size
        self.prompting = runtime.prompting
        self._runtime = runtime

    def _unload(self) -> None:
        runtime, self._runtime = self._runtime, None
        self.prompting = None
        if runtime is None or self._loader is not None:
            return
        import gc

        import torch

        del runtime
        gc.collect()
        torch.cuda.empty_cache()

    def _require(self) -> Runtime:
        runtime = self._runtime
        if runtime is None:
            raise EngineNotReady("No local model is loaded.", headers={"Retry-After": "5"})
        return runtime

    # -- the worker's side -------------------------------------------------------------

    def _start(self, job: Job) -> None:
        runtime = self._require()
        params = job.params
        native = runtime.new_job(
            input_ids=runtime.input_ids(job.prompt_ids),
            max_new_tokens=params.max_tokens,
            gen_settings=sampler_settings(runtime.new_settings(), params),
            seed=params.seed,
            stop_conditions=[*sorted(runtime.eos_ids), *params.stop],
            decode_special_tokens=False,
            identifier=job,
        )
        runtime.generator.enqueue(native)
        job.native = _Native(native)

    def _step(self, active: list[Job]) -> list[tuple[Job, Delta]]:
        produced: list[tuple[Job, Delta]] = []
        for result in self._require().generator.iterate():
            if result.get("stage") != "streaming":
                continue  # "started", "prefill": nothing to say yet
            job = result.get("identifier")
            if not isinstance(job, Job) or job.native is None:
                continue
            native: _Native = job.native
            ids = result.get("token_ids")
            new = int(ids.shape[-1]) if ids is not None else 0
            native.tokens += new
            text = result.get("text") or ""
            if result.get("eos"):
                reason = result.get("eos_reason")
                count = int(result.get("new_tokens", native.tokens))
                finish = "length" if reason == "max_new_tokens" else "stop"
                produced.append((job, Delta(text, count, finish, new)))
                job.native = None
            else:
                produced.append((job, Delta(text, native.tokens, None, new)))
        return produced

    def _drop(self, job: Job) -> None:
        native, job.native = job.native, None
        if native is not None and self._runtime is not None:
            self._runtime.generator.cancel(native.job)

    def _reset(self, jobs: list[Job]) -> None:
        runtime = self._runtime
        for job in jobs:
            self._safe_drop(job)
        if runtime is not None:
            runtime.generator.clear_queue()  # whatever the failure left half-done

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        runtime = self._runtime
        info["cache"] = self.cache_type
        info["paged"] = runtime.paged if runtime is not None else None
        info["gpu_bytes"] = runtime.gpu_bytes if runtime is not None else 0
        return info
