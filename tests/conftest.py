"""Fixtures: a fake upstream on loopback and the sidecar started as a real process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from tests.support.anthropic_mock import AnthropicMock
from tests.support.redis_server import RedisServer
from tests.support.scripted_upstream import ScriptedUpstream
from tests.support.sidecar import Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[MockUpstream]:
    mock = MockUpstream()
    mock.start()
    yield mock
    mock.stop()


# One of each per test module that asks: Anthropic's wire format, and a scripted OpenAI one.
@pytest.fixture(scope="module")
def claude() -> Iterator[AnthropicMock]:
    server = AnthropicMock()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    server = ScriptedUpstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the test module's own, for the tests of what is kept in Redis."""
    instance = RedisServer(tmp_path_factory.mktemp("redis"))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def upstream(mock_upstream: MockUpstream) -> MockUpstream:
    mock_upstream.reset()
    return mock_upstream


@pytest.fixture(scope="session")
def sidecar(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Sidecar]:
    instance = start_sidecar(base_config(mock_upstream), tmp_path_factory.mktemp("sidecar"))
    yield instance
    instance.stop()


@pytest.fixture
def sidecar_factory(mock_upstream: MockUpstream, tmp_path: Path
                    ) -> Iterator[Callable[..., Sidecar]]:
    started: list[Sidecar] = []

    def factory(config_text: str | None = None, **kwargs: str) -> Sidecar:
        text = config_text if config_text is not None else base_config(mock_upstream, **kwargs)
        instance = start_sidecar(text, tmp_path / f"sidecar{len(started)}")
        started.append(instance)
        return instance

    yield factory
    for instance in started:
        instance.stop()


@pytest.fixture
def client(sidecar: Sidecar) -> openai.OpenAI:
    return sidecar.client()
