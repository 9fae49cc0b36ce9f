"""The model's own chat template, rendered in a sandbox.

A template comes with the model (chat_template.jinja, or `chat_template` in
tokenizer_config.json) and is code from whoever published the model: it runs in Jinja's
immutable sandbox, which refuses attribute tricks and mutation of what it is given.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sidecar.errors import InvalidRequest


class TemplateMissing(Exception):
    pass


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
            undefined=jinja2.Undefined,
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(source)
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def from_model_dir(cls, path: Path) -> ChatTemplate:
        config: dict[str, Any] = {}
        config_file = path / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
        source: Any = None
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            source = jinja_file.read_text(encoding="utf-8")
        else:
            source = config.get("chat_template")
            if isinstance(source, list):  # named templates: the default one
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default")
        if not isinstance(source, str) or not source.strip():
            raise TemplateMissing(
                f"the model in {path} has no chat template (neither chat_template.jinja nor "
                "`chat_template` in tokenizer_config.json); add one, or use /v1/completions "
                "with a prompt you format yourself"
            )
        return cls(source, bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")))

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True
               ) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, tools=None,
            )
        except TemplateRefused as exc:
            raise InvalidRequest(f"The model's chat template refused the messages: {exc}",
                                 param="messages") from None
        except jinja2.TemplateError as exc:
            raise InvalidRequest(f"The model's chat template failed on these messages: {exc}",
                                 param="messages") from None


class TemplateRefused(Exception):
    pass


def _raise(message: str) -> None:
    raise TemplateRefused(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        value = value.get("content")
    return value if isinstance(value, str) else ""
