"""The local engines' errors: what the operator reads at start-up, and what a client gets."""

from __future__ import annotations

from sidecar.errors import InvalidRequest, Spillable, UpstreamError


class EngineUnusable(Exception):
    """The engine cannot run on this machine; the message is one sentence for the operator."""


class EngineBusy(Spillable):
    """The queue is full: another target may take the request (spill-over)."""

    code = "engine_overloaded"


class EngineNotReady(Spillable):
    """No model is loaded, or one is being loaded."""

    code = "engine_not_ready"


class EngineFailure(UpstreamError):
    """The generator failed while it held the job; the engine recovers for the next one.
    Like an upstream's failure, it counts against the target and lets another take the
    request before the first byte."""

    status = 500
    type = "server_error"
    code = "engine_failure"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"
