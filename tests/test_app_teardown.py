"""Tearing the app down never hangs on a part that will not stop: a background task that
ignores its cancellation is waited for briefly, then left, with a line in the log."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from sidecar.app import _cancelled


async def test_a_task_that_will_not_stop_is_left_after_the_wait(
        caplog: pytest.LogCaptureFixture) -> None:
    never = asyncio.Event()

    async def stubborn() -> None:
        while not never.is_set():
            try:
                await never.wait()
            except asyncio.CancelledError:
                continue  # as a library stuck in its own clean-up behaves

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sidecar"):
        await _cancelled(task, within_s=0.2)
    assert time.monotonic() - started < 1.0
    assert "did not stop when asked" in caplog.text
    assert caplog.records[-1].__dict__["fields"]["task"] == "stubborn"
    never.set()
    await asyncio.wait([task], timeout=1)
    assert task.done()


async def test_a_task_that_stops_is_waited_for() -> None:
    stopped = asyncio.Event()

    async def polite() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    task = asyncio.create_task(polite())
    await asyncio.sleep(0)
    await _cancelled(task)
    assert stopped.is_set() and task.cancelled()
