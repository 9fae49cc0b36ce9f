"""The SSE writer: on loopback, a fault of ours in the middle of a stream ends it with the
protocol's error event, never with a second response written into the first one's body; and
events a source gives without waiting go out together, while nothing is held over a wait."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import aiohttp
import pytest
from aiohttp import web

from sidecar.api.openai_writer import OPENAI_SSE
from sidecar.api.sse_writer import WRITE_TOGETHER, write_sse, write_together
from sidecar.appkeys import CONTEXT
from sidecar.engines.job import Delta, Job, Params
from sidecar.errors import UpstreamError
from sidecar.exchange import Answer
from sidecar.observability.timing import RequestContext
from sidecar.security.jwt import ANONYMOUS
from tests.support.in_process import serving


async def served(source: AsyncGenerator[bytes, None]) -> tuple[int, bytes, RequestContext]:
    """A stream whose first event is {"n":1} and the rest `source`'s, written by write_sse
    on loopback: the status, the body read to its end, and the request's context."""
    contexts: list[RequestContext] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        context = request[CONTEXT] = RequestContext("req_1", ANONYMOUS)
        contexts.append(context)
        return await write_sse(request, Answer(b"", source, b'{"n":1}'), OPENAI_SSE)

    app = web.Application()
    app.router.add_get("/", handler)
    async with serving(app) as url, aiohttp.ClientSession() as session, \
            session.get(url) as reply:
        return reply.status, await reply.read(), contexts[0]


async def test_a_fault_mid_stream_ends_it_with_an_error_event() -> None:
    async def broken() -> AsyncGenerator[bytes, None]:
        yield b'{"n":2}'
        raise RuntimeError("a fault of ours")

    status, body, context = await served(broken())
    assert status == 200  # and a chunked body that ends cleanly
    assert body.startswith(b'data: {"n":1}\n\ndata: {"n":2}\n\ndata: {"error":')
    assert b"req_1" in body and b"[DONE]" not in body
    assert b"HTTP/1.1" not in body
    assert context.record.stream_error == "server_error"


# -- write_together: events given without a wait share one write ---------------------------

def _frame(data: bytes) -> bytes:
    return b"<" + data + b">"


class Writes:
    """A sink that keeps what is written; `fail_at`: the write that finds the client gone;
    `slow_s`: how long the socket is full after the first write."""

    def __init__(self, fail_at: int | None = None, slow_s: float = 0.0) -> None:
        self.calls: list[bytes] = []
        self.fail_at = fail_at
        self.slow_s = slow_s

    def write_now(self, chunk: bytes) -> bool:
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise ConnectionResetError("client gone")
        self.calls.append(chunk)
        return True  # a wait for the socket after every write

    async def settle(self) -> None:
        await asyncio.sleep(self.slow_s if len(self.calls) == 1 else 0)


async def test_events_given_without_a_wait_go_out_in_one_write() -> None:
    async def burst() -> AsyncGenerator[bytes, None]:
        for i in range(5):
            yield b"%d" % i

    writes = Writes()
    await write_together(b"f", burst(), _frame, writes)
    assert writes.calls == [b"<f><0><1><2><3><4>"]


async def test_the_sources_wait_sends_what_it_gave_before_waiting() -> None:
    gate = asyncio.Event()

    async def spaced() -> AsyncGenerator[bytes, None]:
        yield b"a"
        yield b"b"
        await gate.wait()
        yield b"c"

    writes = Writes()
    task = asyncio.create_task(write_together(b"f", spaced(), _frame, writes))
    await asyncio.sleep(0.01)  # the source waits at the gate
    assert writes.calls == [b"<f><a><b>"]
    gate.set()
    await task
    assert writes.calls == [b"<f><a><b>", b"<c>"]


async def test_a_long_burst_is_written_in_pieces_of_bounded_size() -> None:
    event = b"x" * 1000

    async def burst() -> AsyncGenerator[bytes, None]:
        for _ in range(200):
            yield event

    writes = Writes()
    await write_together(b"f", burst(), _frame, writes)
    assert b"".join(writes.calls) == _frame(b"f") + _frame(event) * 200
    assert len(writes.calls) > 1
    assert all(len(c) < WRITE_TOGETHER + len(_frame(event)) for c in writes.calls)


async def test_what_came_before_a_failure_is_written_then_the_failure_raised() -> None:
    async def broken() -> AsyncGenerator[bytes, None]:
        yield b"a"
        raise UpstreamError("broke")

    writes = Writes()
    with pytest.raises(UpstreamError):
        await write_together(b"f", broken(), _frame, writes)
    assert writes.calls == [b"<f><a>"]


async def test_a_client_gone_while_the_source_waits_unwinds_the_source() -> None:
    closed = asyncio.Event()

    async def waiting() -> AsyncGenerator[bytes, None]:
        try:
            yield b"a"
            await asyncio.sleep(0.01)
            yield b"b"
        finally:
            closed.set()

    events = waiting()
    with pytest.raises(ConnectionResetError):
        await write_together(b"f", events, _frame, Writes(fail_at=0))
    assert closed.is_set()
    await events.aclose()  # closing it afterwards, as the answer does, is fine


async def test_a_cancel_while_the_source_waits_reaches_the_source() -> None:
    heard: list[str] = []

    async def slow() -> AsyncGenerator[bytes, None]:
        try:
            yield b"a"
            await asyncio.sleep(30)
            yield b"b"
        except asyncio.CancelledError:
            heard.append("cancelled")
            raise

    events = slow()
    writes = Writes()
    task = asyncio.create_task(write_together(b"f", events, _frame, writes))
    while not writes.calls:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert heard == ["cancelled"]
    assert writes.calls == [b"<f><a>"]
    await events.aclose()


async def test_a_heartbeat_due_while_held_events_are_written_does_not_cancel_the_stream() -> None:
    # The local engine's deltas wait under asyncio.timeout(heartbeat_s), which cancels the
    # task when it expires. Held events are written while that wait is armed: a client slow
    # to read (a write waiting for the socket longer than a heartbeat) must not turn the
    # heartbeat into a cancellation of the write, and so of the whole stream.
    job = Job([1], Params(max_tokens=2))
    job.put(Delta("a", 1))

    async def deltas() -> AsyncGenerator[bytes, None]:
        async for delta in job.deltas(0.05):
            yield b"" if delta is None else delta.text.encode()

    async def finish() -> None:
        await asyncio.sleep(0.3)
        job.put(Delta("b", 2, "stop"))

    writes = Writes(slow_s=0.2)  # the socket's buffer is full for a while
    finishing = asyncio.create_task(finish())
    events = deltas()
    await asyncio.wait_for(write_together(b"f", events, _frame, writes), 5)
    await finishing
    await events.aclose()
    body = b"".join(writes.calls)
    assert body.startswith(b"<f><a>") and body.endswith(b"<b>")


async def test_a_source_whose_cleanup_waits_is_closed_whole_when_the_client_is_gone() -> None:
    cleaned: list[str] = []

    async def tidy() -> AsyncGenerator[bytes, None]:
        try:
            yield b"a"
            await asyncio.sleep(0.01)
            yield b"b"
        finally:
            await asyncio.sleep(0)  # a cleanup that awaits (closing a connection, say)
            cleaned.append("done")

    events = tidy()
    with pytest.raises(ConnectionResetError):
        await write_together(b"f", events, _frame, Writes(fail_at=0))
    assert cleaned == ["done"]
    await events.aclose()  # not "asynchronous generator is already running"


async def test_a_client_found_gone_mid_stream_is_not_logged_as_a_fault(
        caplog: pytest.LogCaptureFixture) -> None:
    async def reset() -> AsyncGenerator[bytes, None]:
        yield b'{"n":2}'
        raise ConnectionResetError("Cannot write to closing transport")

    _, _, context = await served(reset())
    assert context.record.stream_error == "client_gone"
    assert "stream failed" not in caplog.text
