"""The request's log line, read from a real sidecar's output: what the path recorded of the
request, tokens included whether metrics are on or off."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from tests.support.sidecar import Sidecar, base_config
from tests.support.upstream_mock import MockUpstream


@pytest.mark.parametrize("metrics", ["true", "false"])
def test_the_line_of_a_chat_answer_carries_its_target_and_tokens(
        sidecar_factory: Callable[..., Sidecar], mock_upstream: MockUpstream,
        metrics: str) -> None:
    sidecar = sidecar_factory(base_config(mock_upstream,
                                          extra=f"[metrics]\nenabled = {metrics}\n"))
    reply = sidecar.client().chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hello"}])
    answer = reply.parse()
    rid = reply.headers["X-Request-Id"]
    assert sidecar.wait_for_log(f'"request_id":"{rid}"')
    lines = [orjson.loads(line) for line in sidecar.logs().splitlines()
             if f'"request_id":"{rid}"' in line]
    assert len(lines) == 1
    line = lines[0]
    assert answer.usage is not None
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        answer.usage.prompt_tokens, answer.usage.completion_tokens)
    assert line["target"] == "mock/mock-gpt" and line["model"] == "gpt-test"
    assert line["status"] == 200 and line["first_byte_us"] > 0
