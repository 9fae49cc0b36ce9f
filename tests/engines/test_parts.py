"""The pure parts of the local engines: stop strings over a token stream, the sandboxed chat
template, sampling with OpenAI's parameters, and the local provider's configuration."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from sidecar import config, settings
from sidecar.engines.chat_template import ChatTemplate, TemplateMissing
from sidecar.engines.job import Params
from sidecar.engines.text import Detokenizer
from sidecar.errors import InvalidRequest

PIECES = ["The", " cap", "ital", " is", " Par", "is", "."]


def decode(ids: Sequence[int]) -> str:
    return "".join(PIECES[i] for i in ids)


def run(stops: Sequence[str]) -> tuple[list[str], bool]:
    detok, out = Detokenizer(decode, stops), []
    for n in range(1, len(PIECES) + 1):
        text, stopped = detok.push(list(range(n)))
        out.append(text)
        if stopped:
            return out, True
    out.append(detok.flush())
    return out, False


def test_text_flows_token_by_token_without_stops() -> None:
    out, stopped = run([])
    assert out == [*PIECES, ""] and not stopped


def test_a_stop_string_across_tokens_is_never_sent() -> None:
    out, stopped = run([" Paris"])
    assert stopped and "".join(out) == "The capital is"
    # " Par" was held back until "is" showed it to be the stop string.
    assert out[4] == ""


def test_held_text_that_turns_out_not_to_stop_is_sent() -> None:
    out, stopped = run([" Parma"])
    assert not stopped and "".join(out) == "The capital is Paris."


def test_half_a_character_waits_for_its_other_half() -> None:
    # What a byte-level decode shows while a character's bytes are split across tokens.
    shown = {1: "caf", 2: "caf\ufffd", 3: "café!"}
    detok = Detokenizer(lambda ids: shown[len(ids)], [])
    assert detok.push([0]) == ("caf", False)
    assert detok.push([0, 1]) == ("", False)
    assert detok.push([0, 1, 2]) == ("é!", False)


TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_a_template_renders_messages_and_the_generation_prompt() -> None:
    text = ChatTemplate(TEMPLATE).render([{"role": "user", "content": "hi"}])
    assert text == "<|user|>hi\n<|assistant|>"


def test_a_template_cannot_reach_python_internals() -> None:
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidRequest) as caught:
        evil.render([{"role": "user", "content": "x"}])
    assert caught.value.status == 400


def test_a_template_may_refuse_messages_with_a_400() -> None:
    strict = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('Conversations must start with a user') }}{% endif %}")
    with pytest.raises(InvalidRequest) as caught:
        strict.render([{"role": "assistant", "content": "x"}])
    assert "must start with a user" in caught.value.message


def test_a_model_without_a_template_says_so(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TemplateMissing) as caught:
        ChatTemplate.from_model_dir(tmp_path)
    assert "no chat template" in str(caught.value)
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": [{"name": "default", "template": "{{ messages[0].content }}"}]}')
    assert ChatTemplate.from_model_dir(tmp_path).render([{"role": "user", "content": "ok"}]) == "ok"


def test_sampling_follows_openai_meanings() -> None:
    torch = pytest.importorskip("torch")
    from sidecar.engines.sampling import next_token

    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    assert next_token(logits, Params(max_tokens=1, temperature=0), None, gen) == 1
    # A presence penalty on the leader hands greedy decoding to the runner-up.
    counts = torch.tensor([0.0, 1.0, 0.0, 0.0])
    penalised = Params(max_tokens=1, temperature=0, presence_penalty=0.5)
    assert next_token(logits, penalised, counts, gen) == 2
    # top_k 1 and a tiny top_p leave only the best token, whatever the temperature.
    for params in (Params(max_tokens=1, temperature=2.0, top_k=1),
                   Params(max_tokens=1, temperature=2.0, top_p=0.01)):
        assert {next_token(logits, params, None, gen) for _ in range(50)} == {1}
    # The same seed, the same draws.
    draws = [[next_token(logits, Params(max_tokens=1, temperature=5.0), None,
                         torch.Generator().manual_seed(9)) for _ in range(1)] for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]


def test_a_top_p_of_zero_keeps_the_best_token() -> None:
    # The schema takes 0..1; at 0 every token was cut, the best one too, and sampling from
    # nothing raised in the worker: a 500 (engine_failure) for a request OpenAI accepts.
    torch = pytest.importorskip("torch")
    from sidecar.engines.sampling import next_token

    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    params = Params(max_tokens=1, temperature=1.0, top_p=0.0)
    assert {next_token(logits, params, None, gen) for _ in range(20)} == {1}


def local_settings(body: str) -> str:
    return f"""
[providers.local]
kind = "local"
{body}

[models.m]
targets = [ {{ provider = "local" }} ]
"""


def test_a_local_provider_needs_no_url_and_has_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(local_settings(""))
    provider = config.load(path).providers["local"]
    assert isinstance(provider, settings.LocalProviderSettings)
    assert (provider.engine, provider.model) == ("auto", "builtin:smollm2-135m-instruct")


@pytest.mark.parametrize(("body", "message"), [
    ('engine = "vllm"', "`providers.local.engine`"),
    ("max_batch_size = 0", "`providers.local.max_batch_size`"),
    ('base_url = "http://x"', "`providers.local`: Object contains unknown field `base_url`"),
    ('cache = "q3"', "`providers.local.cache`"),
])
def test_local_provider_errors_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(local_settings(body))
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert message in str(caught.value)


def test_an_unknown_provider_kind_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(local_settings("").replace('kind = "local"', 'kind = "ollama"'))
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert "`providers.local.kind`" in str(caught.value) and "ollama" in str(caught.value)
