"""A sidecar for the Anthropic front door's tests: a real process on loopback whose models are
answered by a Messages-wire upstream (passed through), the OpenAI mock and a scripted OpenAI
upstream (translated), and fallbacks that cross protocols; with the cache on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import orjson

from tests.support.anthropic_mock import ANTHROPIC_KEY, AnthropicMock
from tests.support.scripted_upstream import ScriptedUpstream
from tests.support.sidecar import Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream


def door_config(mock: MockUpstream, claude: AnthropicMock, scripted: ScriptedUpstream,
                extra: str = "") -> str:
    return base_config(mock, extra=f"""
[providers.claude]
kind = "anthropic"
base_url = "{claude.base_url}"
api_key_env = "ANTHROPIC_TEST_KEY"
timeout_connect_s = 2
timeout_read_s = 1.5
max_retries = 1
max_retry_wait_s = 3

[providers.scripted]
kind = "openai"
base_url = "{scripted.base_url}"

[models."claude"]
targets = [ {{ provider = "claude", model = "claude-test" }} ]

[models."scripted"]
targets = [ {{ provider = "scripted", model = "scripted" }} ]

[models."claude-then-openai"]
targets = [ {{ provider = "claude", model = "claude-test", weight = 1 }},
            {{ provider = "mock", model = "mock-gpt", weight = 0, fallback_only = true }} ]

[cache]
enabled = true
{extra}
""")


def start_door(mock: MockUpstream, claude: AnthropicMock, scripted: ScriptedUpstream,
               workdir: Path, extra: str = "") -> Sidecar:
    return start_sidecar(door_config(mock, claude, scripted, extra), workdir,
                         env={"ANTHROPIC_TEST_KEY": ANTHROPIC_KEY})


def client(sidecar: Sidecar, key: str = "unused", **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=sidecar.url, api_key=key, max_retries=0, **kwargs)


def async_client(sidecar: Sidecar, key: str = "unused") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=sidecar.url, api_key=key, max_retries=0)


def said(text: str) -> Any:
    return [{"role": "user", "content": text}]


def steer(**directives: object) -> Any:
    """A turn the Messages mock reads as directives."""
    return said("mock:" + orjson.dumps(directives).decode())


def script(*events: str) -> Any:
    """A turn the scripted upstream streams back as these events."""
    return said("script:" + orjson.dumps(list(events)).decode())


def sse_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """The (event name, data) pairs of an SSE body."""
    out = []
    for block in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        out.append((lines.get("event", ""), orjson.loads(lines["data"])))
    return out
