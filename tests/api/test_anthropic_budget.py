"""The tenant's token budget on the Anthropic front door: a request reserves its prompt estimate
and `max_tokens`, and is settled on the usage its answer reports, read from a Messages answer
or from a Messages stream's message_start and message_delta, whichever target answered."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest

from tests.support.anthropic_mock import AnthropicMock
from tests.support.messages_door import client, said, start_door
from tests.support.scripted_upstream import ScriptedUpstream
from tests.support.sidecar import Sidecar
from tests.support.upstream_mock import MockUpstream

# A request asks for 150 tokens at most: two fit in the minute only if the first one gives
# back what it did not use.
BUDGET = "\n[limits]\ntokens_per_minute = 260\n"


@pytest.fixture
def budgeted(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Sidecar]:
    claude, scripted = AnthropicMock(), ScriptedUpstream()
    claude.start()
    scripted.start()
    instance = start_door(mock_upstream, claude, scripted, tmp_path_factory.mktemp("budget"),
                          BUDGET)
    yield instance
    instance.stop()
    claude.stop()
    scripted.stop()


@pytest.mark.parametrize("model", ["claude", "gpt-test"])
@pytest.mark.parametrize("stream", [False, True])
def test_the_budget_is_settled_on_the_usage_the_answer_reports(
        budgeted: Sidecar, model: str, stream: bool) -> None:
    door = client(budgeted)
    for i in range(2):
        if stream:
            with door.messages.stream(model=model, max_tokens=150,
                                      messages=said(f"ask {i}")) as reader:
                assert reader.get_final_text()
        else:
            assert door.messages.create(model=model, max_tokens=150,
                                        messages=said(f"ask {i}")).content
    # The budget still holds: a third request that could not fit is refused.
    with pytest.raises(anthropic.RateLimitError):
        door.messages.create(model=model, max_tokens=250, messages=said("too much"))
