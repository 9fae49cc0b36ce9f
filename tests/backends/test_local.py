"""The embedded model on the CPU, end to end: the sidecar as a real process, the `openai`
client, real generation with SmolLM2-135M-Instruct (loaded once for these tests)."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.sidecar import Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG_ANSWER = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]


def local_config(mock: MockUpstream, *, local: str = "") -> str:
    return base_config(mock, extra=f"""
[providers.local]
kind = "local"
engine = "transformers"
max_seq_len = 512
max_batch_size = 2
max_queue = 1
stall_s = 20
{local}

[models."local"]
targets = [ {{ provider = "local" }} ]

[models."local-spill"]
targets = [ {{ provider = "local", weight = 1 }},
            {{ provider = "mock", model = "mock-gpt", fallback_only = true }} ]

[models."local-long-prompts-upstream"]
targets = [ {{ provider = "local", weight = 1 }}, {{ provider = "mock", model = "mock-gpt" }} ]
prefer_local_below_tokens = 200
""")


def wait_ready(sidecar: Sidecar, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(sidecar.url + "/readyz").status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"the local model did not load:\n{sidecar.logs()[-3000:]}")


@pytest.fixture(scope="session")
def local(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Sidecar]:
    instance = start_sidecar(local_config(mock_upstream), tmp_path_factory.mktemp("local"))
    wait_ready(instance)
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def hf_tokenizer() -> Any:
    """The model's tokenizer and template as transformers applies them: the reference our
    own rendering and counting must agree with."""
    from transformers import AutoTokenizer

    from sidecar.engines.models import cache_dir

    return AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m-instruct")


def wait_idle(sidecar: Sidecar, timeout: float = 5) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = engine_state(sidecar)
        if state["active_jobs"] == 0 and state["queue_depth"] == 0:
            break
        time.sleep(0.02)
    return state


def engine_state(sidecar: Sidecar) -> dict[str, Any]:
    return httpx.get(sidecar.url + "/admin/api/engines").json()["engines"]["local"]  # type: ignore[no-any-return]


def test_a_real_answer_with_usage_that_matches_the_tokenizer(local: Sidecar,
                                                             hf_tokenizer: Any) -> None:
    reply = local.client().chat.completions.create(
        model="local", messages=QUESTION, temperature=0, max_tokens=40)  # type: ignore[arg-type]
    text = reply.choices[0].message.content or ""
    assert "Paris" in text
    assert reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.model == "local"
    prompt = hf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(prompt)
    # The end-of-turn token is generated and counted, but is not text.
    assert reply.usage.completion_tokens == len(hf_tokenizer.encode(text)) + 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_stream_says_the_same_as_the_answer(local: Sidecar) -> None:
    client = local.client()
    whole = client.chat.completions.create(model="local", messages=QUESTION, temperature=0,  # type: ignore[arg-type]
                                           max_tokens=40)
    chunks = list(client.chat.completions.create(
        model="local", messages=QUESTION, temperature=0, max_tokens=40, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_max_tokens_ends_with_length(local: Sidecar) -> None:
    reply = local.client().chat.completions.create(
        model="local", messages=LONG_ANSWER, max_tokens=5, seed=1)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_a_stop_string_ends_the_answer_before_it(local: Sidecar) -> None:
    client = local.client()
    whole = client.chat.completions.create(model="local", messages=QUESTION, temperature=0,  # type: ignore[arg-type]
                                           max_tokens=40).choices[0].message.content or ""
    assert " is " in whole
    reply = client.chat.completions.create(model="local", messages=QUESTION, temperature=0,  # type: ignore[arg-type]
                                           max_tokens=40, stop=[" is ", "never-said"])
    assert reply.choices[0].message.content == whole[:whole.index(" is ")]
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="local", messages=QUESTION, temperature=0,  # type: ignore[arg-type]
                                              max_tokens=40, stop=" is ", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        whole[:whole.index(" is ")]


def test_a_seed_repeats_a_sampled_answer(local: Sidecar) -> None:
    client = local.client()
    for seed in (7, -3, 2**63 - 1):  # any 64-bit integer is a seed
        answers = {client.chat.completions.create(
            model="local", messages=LONG_ANSWER, temperature=1.0, seed=seed, max_tokens=8,  # type: ignore[arg-type]
        ).choices[0].message.content for _ in range(2)}
        assert len(answers) == 1


def test_legacy_completions_take_a_raw_prompt(local: Sidecar) -> None:
    reply = local.client().completions.create(model="local", prompt="The capital of France is",
                                              max_tokens=4, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].text


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_what_the_engine_cannot_honour_is_a_400(local: Sidecar, extra: dict[str, Any],
                                                 param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        local.client().chat.completions.create(model="local", messages=QUESTION, max_tokens=3,  # type: ignore[arg-type]
                                               **extra)
    assert caught.value.body["param"] == param  # type: ignore[index]


def test_an_image_for_a_text_model_is_a_400(local: Sidecar) -> None:
    image = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
    with pytest.raises(openai.BadRequestError) as caught:
        local.client().chat.completions.create(model="local", messages=image)  # type: ignore[arg-type]
    assert caught.value.body["param"] == "messages[0].content[1]"  # type: ignore[index]
    assert "text only" in caught.value.body["message"]  # type: ignore[index]


def test_a_prompt_longer_than_the_context_is_refused_before_queueing(local: Sidecar) -> None:
    long = [{"role": "user", "content": "word " * 600}]
    with pytest.raises(openai.BadRequestError) as caught:
        local.client().chat.completions.create(model="local", messages=long)  # type: ignore[arg-type]
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        local.client().chat.completions.create(model="local", messages=QUESTION,  # type: ignore[arg-type]
                                               max_tokens=5000)
    assert engine_state(local)["queue_depth"] == 0


def test_embeddings_are_not_served_by_a_chat_model(local: Sidecar) -> None:
    with pytest.raises(openai.BadRequestError):
        local.client().embeddings.create(model="local", input="hello")


def test_concurrent_requests_all_complete(local: Sidecar) -> None:
    client = local.client()

    def ask(i: int) -> str:
        reply = client.chat.completions.create(
            model="local", messages=[{"role": "user", "content": f"Count to {i}."}],  # type: ignore[arg-type]
            max_tokens=8, seed=i)
        assert reply.choices[0].finish_reason in ("stop", "length")
        return reply.choices[0].message.content or ""

    # Two run, one waits: three at once is what this engine takes.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(ask, range(3)))
    assert all(answers)
    state = engine_state(local)
    assert state["active_jobs"] == 0 and state["queue_depth"] == 0


def _open_streams(sidecar: Sidecar, model: str, count: int) -> list[Any]:
    client = sidecar.client()
    streams = []
    for _ in range(count):
        stream = client.chat.completions.create(model=model, messages=LONG_ANSWER,  # type: ignore[arg-type]
                                                max_tokens=400, stream=True)
        next(iter(stream))  # the role chunk: the job is queued or running
        streams.append(stream)
    return streams


def test_a_full_queue_answers_503_and_spills_over_where_the_route_allows(
        local: Sidecar, mock_upstream: MockUpstream) -> None:
    mock_upstream.reset()
    streams = _open_streams(local, "local", 3)  # two running, one waiting: full
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            local.client().chat.completions.create(model="local", messages=QUESTION)  # type: ignore[arg-type]
        assert caught.value.status_code == 503
        assert caught.value.code == "engine_overloaded"
        assert caught.value.response.headers["Retry-After"] == "1"
        spilled = local.client().chat.completions.with_raw_response.create(
            model="local-spill", messages=QUESTION)  # type: ignore[arg-type]
        assert spilled.headers["X-Sidecar-Target"] == "mock/mock-gpt"
        assert spilled.headers["X-Sidecar-Spill-Over-From"] == "local/local-spill"
        assert spilled.parse().choices[0].message.content == \
            "Hello from mock: What is the capital of France?"
    finally:
        for stream in streams:
            stream.close()
    assert wait_idle(local)["active_jobs"] == 0


def test_a_client_that_leaves_mid_stream_frees_its_slot(local: Sidecar) -> None:
    wait_idle(local)
    stream = local.client().chat.completions.create(model="local", messages=LONG_ANSWER,  # type: ignore[arg-type]
                                                    max_tokens=400, stream=True)
    chunks = iter(stream)
    for _ in range(4):
        next(chunks)
    assert engine_state(local)["active_jobs"] == 1
    before = engine_state(local)["tokens_generated"]
    stream.close()
    state = wait_idle(local, 2)
    assert state["active_jobs"] == 0
    # Stopped at once: a few tokens after the client left, not the 400 it asked for.
    assert state["tokens_generated"] - before < 20


def test_long_prompts_go_upstream_by_rule(local: Sidecar, mock_upstream: MockUpstream) -> None:
    mock_upstream.reset()
    client = local.client()
    long = [{"role": "user", "content": "Summarise: " + "lorem ipsum " * 150}]
    reply = client.chat.completions.with_raw_response.create(
        model="local-long-prompts-upstream", messages=long)  # type: ignore[arg-type]
    assert reply.headers["X-Sidecar-Target"] == "mock/mock-gpt"
    assert len(mock_upstream.requests) == 1


def test_readyz_and_the_admin_api_show_the_engine(local: Sidecar) -> None:
    ready = httpx.get(local.url + "/readyz").json()
    assert ready == {"status": "ready", "engines": {"local": "ready"}}
    state = engine_state(local)
    assert state["engine"] == "transformers"
    assert state["model"] == "builtin:smollm2-135m-instruct"
    assert state["completed"] > 0 and state["tokens_generated"] > 0


def test_unload_and_load_without_a_restart(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    sidecar = start_sidecar(local_config(mock_upstream), tmp_path)
    try:
        wait_ready(sidecar)
        admin = httpx.Client(base_url=sidecar.url + "/admin/api/engines", timeout=120)
        assert admin.post("/local/unload").json()["state"] == "empty"
        ready = httpx.get(sidecar.url + "/readyz")
        assert ready.status_code == 503 and "local empty" in ready.json()["reason"]
        with pytest.raises(openai.APIStatusError) as caught:
            sidecar.client().chat.completions.create(model="local", messages=QUESTION)  # type: ignore[arg-type]
        assert caught.value.status_code == 503 and caught.value.code == "engine_not_ready"
        # The spill-over route still answers, from its other target.
        spilled = sidecar.client().chat.completions.with_raw_response.create(
            model="local-spill", messages=QUESTION)  # type: ignore[arg-type]
        assert spilled.headers["X-Sidecar-Target"] == "mock/mock-gpt"
        refused = admin.post("/local/load", json={"model": str(tmp_path / "nothing-here")})
        assert refused.status_code == 400 and "does not exist" in refused.json()["error"]["message"]
        # A request sent while the model loads waits for it.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            loading = pool.submit(admin.post, "/local/load",
                                  json={"model": "builtin:smollm2-135m-instruct"})
            time.sleep(0.3)
            reply = sidecar.client().chat.completions.create(model="local", messages=QUESTION,  # type: ignore[arg-type]
                                                             max_tokens=3)
            assert reply.choices[0].message.content
            assert loading.result().json()["state"] == "ready"
        assert admin.post("/local/reload").json()["state"] == "ready"
        assert sidecar.wait_for_log('"msg":"local model change"')
        assert admin.post("/nope/reload").status_code == 404
    finally:
        sidecar.stop()


def test_exllamav2_without_a_gpu_fails_at_start_in_one_sentence(
        mock_upstream: MockUpstream, tmp_path: Path) -> None:
    text = local_config(mock_upstream).replace('engine = "transformers"', 'engine = "exllamav2"')
    with pytest.raises(RuntimeError) as caught:
        start_sidecar(text, tmp_path)
    output = str(caught.value)
    assert "exited with 1" in output
    assert "sidecar: cannot start: engine \"exllamav2\" needs" in output
    assert "Traceback" not in output
