"""The ExLlamaV2 engine's own logic on the CPU: parameter mapping, result handling, the hand-off
from its worker thread, cancellation and recovery, with the stand-in generator of
tests/exllamav2_standin.py in place of the GPU one."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from blockbuster import BlockBuster

from sidecar.engines import models
from sidecar.engines.errors import ContextLengthExceeded, EngineBusy, EngineFailure
from sidecar.engines.exllamav2 import ExLlamaV2Engine, sampler_settings
from sidecar.engines.job import Params
from tests.support.exllamav2_standin import (
    EOS,
    GPU_BYTES,
    Generator,
    Job,
    Settings,
    standin_loader,
)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with SmolLM2's real tokenizer and template; the weights file is
    empty, as the stand-in never reads it."""
    real = models.resolve("builtin:smollm2-135m-instruct")
    path = tmp_path_factory.mktemp("exl2-model")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        shutil.copy(real / name, path / name)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.fixture
async def engine(model_dir: Path) -> AsyncIterator[tuple[ExLlamaV2Engine, Generator]]:
    generator = Generator()
    engine = ExLlamaV2Engine(loader=standin_loader(generator, model_dir), max_batch_size=2,
                             max_queue=1, max_seq_len=256, stall_s=5, load_wait_s=5)
    await engine.load(str(model_dir))
    yield engine, generator
    generator.gate.set()
    await engine.close()


async def collect(job: object) -> tuple[str, str | None, int]:
    text, finish, tokens = [], None, 0
    async for delta in job.deltas():  # type: ignore[attr-defined]
        text.append(delta.text)
        finish, tokens = delta.finish_reason, delta.completion_tokens
    return "".join(text), finish, tokens


def test_openai_parameters_replace_the_library_defaults() -> None:
    sampled = sampler_settings(Settings(), Params(max_tokens=1, temperature=0.7, top_p=0.9,
                                                  presence_penalty=0.5, frequency_penalty=0.25))
    assert sampled.token_repetition_penalty == 1.0  # the library's 1.025 would change answers
    assert (sampled.temperature, sampled.top_p, sampled.top_k) == (0.7, 0.9, 0)
    assert (sampled.token_presence_penalty, sampled.token_frequency_penalty) == (0.5, 0.25)
    plain = sampler_settings(Settings(), Params(max_tokens=1))
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 0.0, 0)  # nothing cut
    greedy = sampler_settings(Settings(), Params(max_tokens=1, temperature=0))
    assert (greedy.top_k, greedy.token_repetition_penalty) == (1, 1.0)
    narrowest = sampler_settings(Settings(), Params(max_tokens=1, temperature=0.7, top_p=0))
    assert (narrowest.top_k, narrowest.top_p) == (1, 0.0)  # the best token, not "off"


async def test_a_job_runs_on_the_worker_thread_and_ends_with_length(
        engine: tuple[ExLlamaV2Engine, Generator]) -> None:
    exl, generator = engine
    ids = exl.encode_prompt(exl.render_chat([{"role": "user", "content": "hi"}]))
    job = await exl.submit(ids, Params(max_tokens=5, seed=3, stop=("never",)), wait=True)
    assert await collect(job) == ("Hello there, friend.", "length", 5)
    native: Job = generator.jobs[-1]
    assert native.kwargs["max_new_tokens"] == 5 and native.kwargs["seed"] == 3
    assert native.kwargs["stop_conditions"] == [EOS, "never"]
    assert native.kwargs["decode_special_tokens"] is False
    assert native.kwargs["input_ids"].shape == (1, len(ids))
    assert generator.threads == {"exllamav2-worker"}
    assert threading.current_thread().name not in generator.threads


async def test_a_stop_string_or_token_ends_with_stop(
        engine: tuple[ExLlamaV2Engine, Generator]) -> None:
    exl, generator = engine
    job = await exl.submit([1, 2, 3], Params(max_tokens=50, stop=(" friend",)), wait=True)
    assert (await collect(job))[:2] == ("Hello there,", "stop")
    generator.eos_after = 3
    job = await exl.submit([1, 2, 3], Params(max_tokens=50), wait=True)
    assert await collect(job) == ("Hello there,", "stop", 4)


async def test_cancel_frees_the_slot_before_the_next_token(
        engine: tuple[ExLlamaV2Engine, Generator]) -> None:
    exl, generator = engine
    generator.step_s = 0.005  # 200 tokens take a second: the cancel lands mid-job
    job = await exl.submit([1, 2, 3], Params(max_tokens=200), wait=True)
    seen = 0
    async for _ in job.deltas():
        seen += 1
        if seen == 3:
            break
    generator.gate.clear()  # hold the generator at its next step while the cancel goes in
    await asyncio.sleep(0.05)
    native = generator.jobs[-1]
    before = native.generated
    job.cancel()
    generator.gate.set()
    for _ in range(200):
        if exl.stats.active == 0:
            break
        await asyncio.sleep(0.01)
    assert exl.stats.active == 0 and exl.stats.queued == 0
    assert generator.cancelled == [native]
    assert native.generated <= before + 1  # the step under way, and no further


async def test_a_generator_failure_fails_its_jobs_and_the_next_job_runs(
        engine: tuple[ExLlamaV2Engine, Generator]) -> None:
    exl, generator = engine
    generator.fail_next = 1
    job = await exl.submit([1, 2, 3], Params(max_tokens=5), wait=True)
    with pytest.raises(EngineFailure) as caught:
        await collect(job)
    assert "illegal memory access" in caught.value.message and caught.value.status == 500
    assert generator.cleared == 1
    job = await exl.submit([1, 2, 3], Params(max_tokens=2), wait=True)
    assert await collect(job) == ("Hello there", "length", 2)
    assert exl.stats.failed == 1 and exl.stats.active == 0


async def test_too_long_and_too_many_are_refused_before_the_queue(
        engine: tuple[ExLlamaV2Engine, Generator]) -> None:
    exl, generator = engine
    with pytest.raises(ContextLengthExceeded):
        await exl.submit(list(range(256)), Params(max_tokens=1), wait=True)
    with pytest.raises(ContextLengthExceeded):
        await exl.submit([1, 2], Params(max_tokens=255), wait=True)
    assert generator.jobs == []
    generator.gate.clear()
    jobs = [await exl.submit([1], Params(max_tokens=100), wait=True) for _ in range(3)]
    with pytest.raises(EngineBusy) as caught:
        await exl.submit([1], Params(max_tokens=100), wait=True)
    assert caught.value.status == 503 and caught.value.headers["Retry-After"] == "1"
    for job in jobs:
        job.cancel()
    generator.gate.set()


async def test_the_event_loop_only_waits(engine: tuple[ExLlamaV2Engine, Generator]) -> None:
    exl, _ = engine
    blockbuster = BlockBuster()
    blockbuster.activate()
    try:
        jobs = [await exl.submit([1, 2, 3], Params(max_tokens=20), wait=True) for _ in range(2)]
        results = await asyncio.gather(*(collect(job) for job in jobs))
    finally:
        blockbuster.deactivate()
    assert [r[1:] for r in results] == [("length", 20), ("length", 20)]


async def test_a_stuck_generator_makes_the_engine_look_hung(model_dir: Path) -> None:
    generator = Generator()
    exl = ExLlamaV2Engine(loader=standin_loader(generator, model_dir), max_batch_size=2,
                          max_queue=1, max_seq_len=256, stall_s=0.3, load_wait_s=5)
    await exl.load(str(model_dir))
    try:
        await asyncio.sleep(0.5)  # idle longer than stall_s: not hung, nothing is running
        generator.gate.clear()  # the next step never finishes
        job = await exl.submit([1, 2, 3], Params(max_tokens=50), wait=True)
        await asyncio.sleep(0.1)
        assert exl.stats.active == 1 and not exl.hung()  # a job that just started
        await asyncio.sleep(0.4)
        assert exl.hung()  # no token for longer than stall_s with a job active
        job.cancel()
    finally:
        generator.gate.set()
        await exl.close()
    assert not exl.hung()


async def test_the_engine_reports_the_gpu_memory_its_load_took(
        engine: tuple[ExLlamaV2Engine, Generator]) -> None:
    loaded, _ = engine
    assert loaded.describe()["gpu_bytes"] == GPU_BYTES
