"""What the engines and the model conversion share about the Hugging Face libraries.

Kept apart so that engines/models.py (which converts the embedded model) and
engines/transformers.py (which runs it) need not import each other.
"""

from __future__ import annotations


def quiet_transformers() -> None:
    """No progress bars or advice on the sidecar's log: it is JSON lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
