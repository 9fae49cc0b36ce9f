"""Auth and tenant limits on the Anthropic front door, as on the OpenAI one: the sidecar's JWT
(signed with a real key) as the `anthropic` client's `x-api-key` or as a Bearer token, its
refusals in Anthropic's shape, the token's model list, and the tenant's request budget."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.support.anthropic_mock import ANTHROPIC_KEY, AnthropicMock
from tests.support.auth_helpers import Issuer, jwt_config, make_issuer
from tests.support.messages_door import client, said, start_door
from tests.support.scripted_upstream import ScriptedUpstream
from tests.support.sidecar import Sidecar
from tests.support.upstream_mock import MockUpstream


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return make_issuer(tmp_path_factory.mktemp("issuer"))


@pytest.fixture(scope="module")
def secured(claude: AnthropicMock, mock_upstream: MockUpstream, issuer: Issuer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    scripted = ScriptedUpstream()  # not asked here; the door's configuration names it
    scripted.start()
    extra = jwt_config(f'public_key_file = "{issuer.public_path}"') + \
        "\n[limits]\nrequests_per_minute = 4\n"
    instance = start_door(mock_upstream, claude, scripted, tmp_path_factory.mktemp("secured"),
                          extra)
    yield instance
    instance.stop()
    scripted.stop()


def test_the_token_as_x_api_key_is_served_and_never_forwarded(
        secured: Sidecar, issuer: Issuer, claude: AnthropicMock) -> None:
    token = issuer.token(sub="tenant-key")
    message = client(secured, token).messages.create(model="claude", max_tokens=8,
                                                      messages=said("with a key"))
    assert message.content[0].type == "text"
    sent = claude.requests[-1].headers
    assert sent["x-api-key"] == ANTHROPIC_KEY
    assert token not in str(dict(sent))


def test_the_token_as_a_bearer_token_is_served(secured: Sidecar, issuer: Issuer) -> None:
    bearer = anthropic.Anthropic(base_url=secured.url, auth_token=issuer.token(sub="bearer"),
                                 max_retries=0)
    message = bearer.messages.create(model="gpt-test", max_tokens=8, messages=said("bearer"))
    assert message.content[0].type == "text"


def test_no_token_is_a_401_authentication_error(secured: Sidecar) -> None:
    reply = httpx.post(secured.url + "/v1/messages", json={
        "model": "claude", "max_tokens": 8, "messages": said("hi")})
    assert reply.status_code == 401
    assert reply.json()["type"] == "error"
    assert reply.json()["error"]["type"] == "authentication_error"
    assert "`x-api-key`" in reply.json()["error"]["message"]


def test_a_token_that_does_not_verify_is_refused(secured: Sidecar, issuer: Issuer,
                                                 tmp_path_factory: pytest.TempPathFactory
                                                 ) -> None:
    stranger = make_issuer(tmp_path_factory.mktemp("stranger"))
    with pytest.raises(anthropic.AuthenticationError):
        client(secured, stranger.token()).messages.create(model="claude", max_tokens=8,
                                                          messages=said("hi"))


def test_x_api_key_is_not_a_token_on_the_openai_door(secured: Sidecar, issuer: Issuer) -> None:
    reply = httpx.post(secured.url + "/v1/chat/completions",
                       headers={"x-api-key": issuer.token()},
                       json={"model": "gpt-test", "messages": said("hi")})
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "missing_token"


def test_the_tokens_model_list_holds_on_this_door(secured: Sidecar, issuer: Issuer) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        client(secured, issuer.token(sub="narrow", models=["gpt-test"])).messages.create(
            model="claude", max_tokens=8, messages=said("hi"))
    assert "claude" in str(caught.value)


def test_the_tenants_request_budget_holds_on_this_door(secured: Sidecar, issuer: Issuer
                                                       ) -> None:
    tenant = client(secured, issuer.token(sub="busy"))
    for _ in range(4):
        tenant.messages.count_tokens(model="gpt-test", messages=said("hi"))
    with pytest.raises(anthropic.RateLimitError) as caught:
        tenant.messages.create(model="gpt-test", max_tokens=8, messages=said("hi"))
    assert caught.value.response.headers.get("retry-after")
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["error"]["type"] == "rate_limit_error"
