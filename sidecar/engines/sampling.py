"""Choosing the next token with OpenAI's sampling parameters (torch, on the worker thread)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sidecar.engines.job import Params

if TYPE_CHECKING:
    import torch


def next_token(logits: torch.Tensor, params: Params, counts: torch.Tensor | None,
               generator: torch.Generator) -> int:
    """`logits`: the last position's scores, shape (vocab,). `counts`: how often each token was
    generated so far (for the presence and frequency penalties), or None when neither is set.

    OpenAI's penalties subtract from the logits: presence once for any token already
    generated, frequency once per time it was. Temperature 0 is greedy; top_k 0 and top_p 1
    cut nothing.
    """
    import torch

    logits = logits.float()
    if counts is not None:
        logits = logits - params.frequency_penalty * counts
        logits = logits - params.presence_penalty * (counts > 0).float()
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, index = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        # Keep the smallest set whose mass reaches top_p (always at least the best token).
        drop = cumulative - torch.softmax(ordered, dim=-1) >= params.top_p
        drop[0] = False  # at top_p 0 the test above holds for the best token too
        ordered = ordered.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, index, ordered)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
