"""The record of what happened to one request on its way through the path: which target took
it, which failed or were passed over, what the cache did, the tokens it used and when its first
byte came. The path writes it; observers (the log line, metrics, the admin page) read it and
change nothing."""

from __future__ import annotations


class RequestRecord:
    __slots__ = (
        "cache",
        "endpoint",
        "fallback_from",
        "first_byte_s",
        "model",
        "rule",
        "spill_over_from",
        "stream",
        "stream_error",
        "target",
        "usage",
    )

    def __init__(self) -> None:
        self.endpoint = ""
        self.model = ""  # the public model name the client asked for
        self.target = ""  # "provider/model" of the target that answered
        self.fallback_from: list[str] = []  # targets that failed first, in order
        self.spill_over_from: list[str] = []  # local targets that were full or not loaded
        self.rule = ""  # a routing rule that shaped the choice ("long_prompt")
        self.cache = ""  # "hit" | "miss" | "bypass" | "" (no cache)
        self.stream = False
        self.stream_error = ""  # why a stream ended early: an error code, or client_gone
        # Seconds from the request's arrival to the answer's first byte (a stream's first
        # event, a JSON answer's whole body); None until then.
        self.first_byte_s: float | None = None
        # `usage` of the answer: prompt, completion and total tokens, and cached prompt
        # tokens (-1: not said); None when the answer said none.
        self.usage: tuple[int, int, int, int] | None = None

    def log_fields(self, fields: dict[str, object]) -> None:
        """What the access log line shows of this record."""
        if self.model:
            fields["model"] = self.model
        if self.target:
            fields["target"] = self.target
        if self.fallback_from:
            fields["fallback_from"] = ", ".join(self.fallback_from)
        if self.spill_over_from:
            fields["spill_over_from"] = ", ".join(self.spill_over_from)
        if self.rule:
            fields["rule"] = self.rule
        if self.cache:
            fields["cache"] = self.cache
        if self.stream:
            fields["stream"] = True
        if self.stream_error:
            fields["stream_error"] = self.stream_error
        if self.first_byte_s is not None:
            fields["first_byte_us"] = int(self.first_byte_s * 1_000_000)
        if self.usage is not None:
            fields["prompt_tokens"], fields["completion_tokens"] = self.usage[:2]
