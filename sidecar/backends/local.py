"""A model inside this process behind the OpenAI API: the request is mapped onto an engine's
parameters, and what the engine generates becomes OpenAI's chunks and answers."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import orjson

from sidecar.backends.base import HEARTBEAT, Call
from sidecar.engines.job import Params
from sidecar.engines.worker import ThreadedEngine
from sidecar.errors import InvalidRequest
from sidecar.protocol.chat import Event, Finish, TextDelta, Usage
from sidecar.protocol.openai_chat import ChunkWriter, answer_json
from sidecar.protocol.requests import Sampling, check_local_ranges, validate
from sidecar.settings import LocalProviderSettings


@dataclass(slots=True)
class Plan:
    """A request the engine can run: its prompt ids and parameters, and how to answer."""

    chat: bool
    model: str
    prompt_ids: list[int]
    params: Params
    include_usage: bool


class LocalBackend:
    protocol = "openai"  # its calls and answers; others are translated on the way
    default_max_tokens: int | None = None  # the engine has its own default

    def __init__(self, name: str, engine: ThreadedEngine, settings: LocalProviderSettings,
                 heartbeat_s: float) -> None:
        self.name = name
        self.engine = engine
        self.settings = settings
        self.heartbeat_s = heartbeat_s
        self.fingerprint = f"fp_local_{engine.kind}"

    async def complete(self, call: Call) -> bytes:
        plan = await self._plan(call)
        job = await self.engine.submit(plan.prompt_ids, plan.params, wait=call.patient)
        events: list[Event] = []
        finish = "stop"
        tokens = 0
        started = perf_counter()
        try:
            async for delta in job.deltas():
                assert delta is not None
                events.append(TextDelta(delta.text))
                tokens = delta.completion_tokens
                if delta.finish_reason is not None:
                    finish = delta.finish_reason
        finally:
            job.cancel()  # a client gone mid-generation frees the slot
            call.timing.upstream += perf_counter() - started  # the model's time, not ours
        events += (Finish(finish), Usage(len(plan.prompt_ids), tokens))
        head = self._head(plan, "chat.completion" if plan.chat else "text_completion")
        return answer_json(head, plan.chat, events)

    async def stream(self, call: Call) -> AsyncGenerator[bytes, None]:
        plan = await self._plan(call)
        job = await self.engine.submit(plan.prompt_ids, plan.params, wait=call.patient)
        try:
            head = self._head(plan, "chat.completion.chunk" if plan.chat else "text_completion")
            if plan.include_usage:
                head["usage"] = None
            chunks = ChunkWriter(head, plan.chat)
            if plan.chat:  # OpenAI's first chunk names the role
                yield chunks.role()
            tokens = 0
            timing = call.timing
            async with contextlib.aclosing(job.deltas(self.heartbeat_s)) as deltas:
                while True:
                    waited = perf_counter()
                    try:
                        delta = await anext(deltas)
                    except StopAsyncIteration:
                        break
                    finally:
                        timing.upstream += perf_counter() - waited
                    if delta is None:
                        yield HEARTBEAT
                        continue
                    tokens = delta.completion_tokens
                    if delta.text:
                        yield chunks.event(TextDelta(delta.text))
                    if delta.finish_reason is not None:
                        yield chunks.event(Finish(delta.finish_reason))
            if plan.include_usage:
                yield chunks.event(Usage(len(plan.prompt_ids), tokens))
        finally:
            job.cancel()

    def _head(self, plan: Plan, kind: str) -> dict[str, Any]:
        prefix = "chatcmpl-" if plan.chat else "cmpl-"
        return {"id": prefix + uuid.uuid4().hex[:24], "object": kind,
                "created": int(time.time()), "model": plan.model,
                "system_fingerprint": self.fingerprint}

    async def probe(self) -> bool:
        """A hung engine is taken out of rotation; one that loads is not (it will answer)."""
        return not self.engine.hung()

    async def close(self) -> None:
        await self.engine.close()

    # -- mapping -----------------------------------------------------------------------

    async def _plan(self, call: Call) -> Plan:
        engine = self.engine
        if not engine.ready:  # the template and tokenizer come with the model
            waited = perf_counter()
            try:
                await engine.ensure_ready(call.patient)
            finally:
                # Waiting for a model to load is neither the sidecar's overhead nor the
                # model's generation: it is logged as its own duration.
                call.timing.model_wait += perf_counter() - waited
        return self.plan(call)

    def plan(self, call: Call) -> Plan:
        payload = orjson.loads(call.body)
        if call.endpoint == "embeddings":
            raise InvalidRequest(
                f"The local model behind `{payload.get('model')}` does not serve embeddings.",
                param="model", code="unsupported_endpoint")
        chat = call.endpoint == "chat/completions"
        _refuse_unsupported(payload, chat)
        # Ranges an upstream may take but a model run here cannot (temperature over 2).
        check_local_ranges(validate(payload, Sampling))
        engine = self.engine
        if chat:
            messages = _messages(payload["messages"])
            prompt_ids = engine.encode_prompt(engine.render_chat(messages))
        else:
            prompt_ids = _prompt_ids(payload["prompt"], engine)
        return Plan(
            chat=chat,
            model=str(payload["model"]),
            prompt_ids=prompt_ids,
            params=self._params(payload, len(prompt_ids)),
            include_usage=bool(payload.get("stream") and
                               (payload.get("stream_options") or {}).get("include_usage")),
        )

    def _params(self, payload: dict[str, Any], prompt_tokens: int) -> Params:
        limit = payload.get("max_completion_tokens") or payload.get("max_tokens")
        if limit is None:
            room = self.engine.max_seq_len - prompt_tokens
            default = self.settings.default_max_tokens
            limit = min(default, room) if default else room
            limit = max(limit, 1)  # a prompt that fills the context is refused by the engine
        stop = payload.get("stop")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > 4:
            raise InvalidRequest("Invalid value for `stop`: at most 4 sequences.", param="stop")
        top_k = payload.get("top_k", 0)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise InvalidRequest("Invalid value for `top_k`: expected an integer >= 0.",
                                 param="top_k")
        return Params(
            max_tokens=int(limit),
            temperature=_number(payload, "temperature", 1.0),
            top_p=_number(payload, "top_p", 1.0),
            top_k=top_k,
            presence_penalty=_number(payload, "presence_penalty", 0.0),
            frequency_penalty=_number(payload, "frequency_penalty", 0.0),
            seed=payload.get("seed"),
            stop=stops,
        )


def _number(payload: dict[str, Any], name: str, default: float) -> float:
    value = payload.get(name)
    return default if value is None else float(value)


# Fields a local model cannot honour: refused with a clear 400 rather than ignored.
_UNSUPPORTED = {
    "tools": "tool calling", "functions": "function calling", "logprobs": "logprobs",
    "top_logprobs": "logprobs", "logit_bias": "logit_bias", "audio": "audio output",
    "prediction": "predicted outputs", "suffix": "suffix", "best_of": "best_of",
    "echo": "echo",
}


def _refuse_unsupported(payload: dict[str, Any], chat: bool) -> None:
    n = payload.get("n")
    if n not in (None, 1):
        raise InvalidRequest(
            "The local engine generates one choice per request; `n` must be 1.", param="n")
    for name, what in _UNSUPPORTED.items():
        if not _is_off(name, payload.get(name)):
            raise InvalidRequest(f"The local engine does not support {what} (`{name}`).",
                                 param=name, code="unsupported_parameter")
    response_format = payload.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
        raise InvalidRequest(
            "The local engine does not support structured output (`response_format`).",
            param="response_format", code="unsupported_parameter")
    modalities = payload.get("modalities")
    if chat and modalities not in (None, ["text"]):
        raise InvalidRequest("The local engine answers in text only (`modalities`).",
                             param="modalities", code="unsupported_parameter")


def _is_off(name: str, value: Any) -> bool:
    if value is None or value is False or value in ("", [], {}):
        return True
    if name == "best_of":
        return bool(value == 1)
    if name == "top_logprobs":
        return bool(value == 0)
    return False


def _messages(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: string content, no image parts."""
    out = []
    for i, message in enumerate(raw):
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                    continue
                raise InvalidRequest(
                    f"The local model reads text only; messages[{i}].content[{j}] is "
                    f"{kind or 'not a content part'!r}.",
                    param=f"messages[{i}].content[{j}]", code="unsupported_content")
            content = "\n".join(texts)
        role = message.get("role")
        out.append({"role": "system" if role == "developer" else role,
                    "content": content or ""})
    return out


def _prompt_ids(prompt: Any, engine: ThreadedEngine) -> list[int]:
    """A legacy prompt: one string or one list of token ids (one prompt per request)."""
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str):
        return engine.encode_prompt(prompt)
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and 0 <= t < engine.vocab_size for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        raise InvalidRequest(f"Invalid value for `prompt`: token ids must be in [0, "
                             f"{engine.vocab_size}).", param="prompt")
    raise InvalidRequest("The local engine takes one prompt per request.", param="prompt")
