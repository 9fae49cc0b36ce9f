"""From messages to token ids, the same way for every engine: the model's chat template
(sandboxed) and its tokenizer.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sidecar.engines.chat_template import ChatTemplate, TemplateMissing
from sidecar.errors import InvalidRequest


class Prompting:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        # One for both sides: the event loop encodes, the worker decodes (tokenizers' Rust
        # object is shared safely between threads; a second copy cost 22 MB resident).
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.template: ChatTemplate | None = None
        self.template_error = ""
        try:
            self.template = ChatTemplate.from_model_dir(path)
        except TemplateMissing as exc:
            self.template_error = str(exc)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        if self.template is None:
            raise InvalidRequest(f"The local model cannot chat: {self.template_error}.",
                                 param="messages", code="no_chat_template")
        return self.template.render(messages)

    def encode(self, text: str) -> list[int]:
        """Ids of a rendered prompt; special tokens written in the text are honoured, none
        is added (the template writes the ones the model expects)."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of generated ids, without special tokens."""
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))


def eos_ids(path: Path, *extra: Any) -> frozenset[int]:
    """Every id that ends a turn: generation_config.json's eos_token_id (an int or a list) and
    any other value given (the model config's)."""
    ids: set[int] = set()
    file = path / "generation_config.json"
    values = list(extra)
    if file.is_file():
        values.append(json.loads(file.read_text(encoding="utf-8")).get("eos_token_id"))
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
