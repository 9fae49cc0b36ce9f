"""The CPU engine on its own, without HTTP: real generation with the embedded
SmolLM2-135M-Instruct, driven through the engine's interface (submit, deltas, cancel)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sidecar.engines.job import Params
from sidecar.engines.transformers import TransformersEngine

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG_ANSWER = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]


async def test_the_cpu_engine_runs_in_bfloat16_when_asked() -> None:

    engine = TransformersEngine(dtype="bfloat16", max_batch_size=1, max_queue=1,
                                max_seq_len=256, stall_s=30, load_wait_s=30)
    await engine.load("builtin:smollm2-135m-instruct")
    try:
        ids = engine.encode_prompt(engine.render_chat(QUESTION))
        job = await engine.submit(ids, Params(max_tokens=12, temperature=0), wait=True)
        text = "".join([d.text async for d in job.deltas() if d is not None])
        assert "Paris" in text
        assert engine.describe()["dtype"] == "bfloat16"
    finally:
        await engine.close()


async def test_sequences_generated_together_say_what_each_says_alone() -> None:
    """Three prompts of different lengths, joining and leaving the batch at different
    steps, give the same greedy text as each generated alone."""

    engine = TransformersEngine(max_batch_size=4, max_queue=4, max_seq_len=512, stall_s=30,
                                load_wait_s=30)
    await engine.load("builtin:smollm2-135m-instruct")
    prompts = [QUESTION, LONG_ANSWER,
               [{"role": "user", "content": "List three fruits, one per line, and nothing else."}]]
    lengths = (10, 24, 16)

    async def run(messages: list[dict[str, str]], tokens: int) -> str:
        ids = engine.encode_prompt(engine.render_chat(messages))
        job = await engine.submit(ids, Params(max_tokens=tokens, temperature=0), wait=True)
        return "".join([d.text async for d in job.deltas() if d is not None])

    try:
        alone = [await run(p, n) for p, n in zip(prompts, lengths, strict=True)]
        together = await asyncio.gather(*(run(p, n) for p, n in zip(prompts, lengths,
                                                                   strict=True)))
        assert list(together) == alone
        assert engine.stats.active == 0
    finally:
        await engine.close()


async def test_a_model_with_sliding_windows_generates_one_sequence_at_a_time(
        tmp_path: Path) -> None:
    """The batch rebuilds caches as full-attention ones; a model whose config says otherwise
    keeps its own cache and runs one sequence at a time."""
    import json
    import os

    from sidecar.engines import models

    real = models.resolve("builtin:smollm2-135m-instruct")
    for item in real.iterdir():
        os.symlink(item, tmp_path / item.name)
    (tmp_path / "config.json").unlink()
    config = json.loads((real / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": 4096}))
    engine = TransformersEngine(max_batch_size=8, max_queue=4, max_seq_len=256, stall_s=30,
                                load_wait_s=30)
    await engine.load(str(tmp_path))
    try:
        assert engine.describe()["max_batch_size"] == 1
        ids = engine.encode_prompt(engine.render_chat(QUESTION))
        jobs = [await engine.submit(ids, Params(max_tokens=6, temperature=0), wait=True)
                for _ in range(2)]
        texts = [("".join([d.text async for d in job.deltas() if d is not None])) for job in jobs]
        assert texts[0] == texts[1] and texts[0]
    finally:
        await engine.close()


async def test_a_cancelled_job_leaves_the_batch_before_the_next_step() -> None:
    """A client that leaves frees its row of the batch (and its part of the KV cache) in the
    worker's next turn, before the forward pass of the rows that stay."""
    from sidecar.engines.batch import cache_layers

    engine = TransformersEngine(max_batch_size=2, max_queue=2, max_seq_len=512, stall_s=30,
                                load_wait_s=30)
    await engine.load("builtin:smollm2-135m-instruct")
    try:
        ids = engine.encode_prompt(engine.render_chat(LONG_ANSWER))
        params = Params(max_tokens=400, temperature=0)
        leaving, staying = [await engine.submit(ids, params, wait=True) for _ in range(2)]
        streams = [leaving.deltas(), staying.deltas()]
        for stream in streams:  # a token each: both rows are in the batch
            assert await anext(stream) is not None
        batch = engine._batch
        assert batch.rows == [leaving, staying]

        leaving.cancel()
        # Its stream ends (without a finish reason) when the worker hands the drop back,
        # which the worker does before it steps the rows that stay: the row is gone by then.
        rest = [d async for d in streams[0] if d is not None]
        assert all(d.finish_reason is None for d in rest)
        assert batch.rows == [staying]
        assert cache_layers(batch._cache)[0][0].shape[0] == 1  # its cache went with it
        assert leaving.native is None
        # The one that stays goes on alone.
        assert await anext(streams[1]) is not None
        assert batch.rows == [staying]
        staying.cancel()
        async with asyncio.timeout(10):
            async for _ in streams[1]:
                pass
        assert batch.rows == [] and batch._cache is None
    finally:
        await engine.close()
