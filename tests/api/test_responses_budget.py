"""The tenant's token budget on the Responses door: a request reserves its prompt estimate and
`max_output_tokens`, and is settled on the usage its answer reports, whole or streamed,
passed through or translated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.in_process import serving
from tests.support.responses_mock import ResponsesUpstream
from tests.support.upstream_mock import MockUpstream
from tests.support.websockets import make_app

# A request asks for 150 tokens at most: two fit in the minute only if the first one gives
# back what it did not use.
BUDGET = "\n[limits]\ntokens_per_minute = 260\n"


@pytest.fixture(scope="module")
def responses_upstream() -> Iterator[ResponsesUpstream]:
    server = ResponsesUpstream()
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("model", ["resp", "gpt-test"])
@pytest.mark.parametrize("stream", [False, True])
async def test_the_budget_is_settled_on_the_usage_the_response_reports(
        upstream: MockUpstream, responses_upstream: ResponsesUpstream, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, model: str, stream: bool) -> None:
    app = make_app(upstream, tmp_path, monkeypatch, extra=f"""
[providers.resp]
kind = "openai"
base_url = "{responses_upstream.base_url}"
responses = true

[models."resp"]
targets = [ {{ provider = "resp", model = "resp-upstream" }} ]
{BUDGET}""")
    async with serving(app) as url:
        sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for i in range(2):
            if stream:
                events = [e async for e in await sdk.responses.create(
                    model=model, input=f"ask {i}", max_output_tokens=150, stream=True)]
                assert events[-1].type == "response.completed"
            else:
                answer = await sdk.responses.create(model=model, input=f"ask {i}",
                                                    max_output_tokens=150)
                assert answer.output_text
        # The budget still holds: a third request that could not fit is refused.
        with pytest.raises(openai.RateLimitError):
            await sdk.responses.create(model=model, input="too much", max_output_tokens=250)
        await sdk.close()
