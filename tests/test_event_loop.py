"""The sidecar in this process, under blockbuster: any blocking call on its event loop fails."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from sidecar import config
from sidecar.app import create_app
from tests.support.in_process import no_blocking, serving
from tests.support.sidecar import UPSTREAM_KEY, base_config
from tests.support.upstream_mock import MockUpstream

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def in_process(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory,
                     monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[openai.AsyncOpenAI]:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    mock_upstream.reset()
    path = tmp_path_factory.mktemp("inproc") / "c.toml"
    path.write_text(base_config(mock_upstream))
    async with serving(create_app(config.load(path))) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        try:
            with no_blocking():
                yield client
        finally:
            await client.close()


async def test_requests_never_block_the_event_loop(in_process: openai.AsyncOpenAI) -> None:
    reply = await in_process.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "Hello from mock: hi"
    stream = await in_process.chat.completions.create(model="gpt-test", messages=USER,  # type: ignore[arg-type]
                                                      stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello from mock: hi"
    with pytest.raises(openai.BadRequestError):
        await in_process.chat.completions.create(model="gpt-test", messages=[])
    with pytest.raises(openai.APIStatusError) as caught:
        await in_process.chat.completions.create(model="dead", messages=USER)  # type: ignore[arg-type]
    assert caught.value.status_code == 502
