"""The sequences a CPU engine generates, as one left-padded batch with one KV cache.

A small model on a CPU is bound by reading its weights: one forward pass for eight sequences
costs about 1.6 times one for a single sequence, so generating them together multiplies the
tokens per second. Sequences join after their own prefill (their cache is padded on the
left to the batch's length, or the batch to theirs) and leave when they end; the attention
mask hides the padding and each row's position ids count only its own tokens.

Worker thread only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def cache_layers(cache: Any) -> list[tuple[Any, Any]]:
    """(keys, values) per layer, each (batch, heads, length, head_dim)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def output_cache(out: Any) -> Any:
    """The updated KV cache of a forward pass: `cache` in newer transformers,
    `past_key_values` before."""
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def new_cache(layers: Iterable[tuple[Any, Any]]) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


class KVBatch:
    def __init__(self) -> None:
        self.rows: list[Any] = []  # whoever owns each row (a job), in row order
        self._cache: Any = None  # the model's own cache object, carried from step to step
        self._mask: Any = None  # (rows, length): 1 for a real token, 0 for padding

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, owner: Any, cache: Any) -> None:
        """Join with the cache of a one-sequence prefill."""
        import torch

        layers = cache_layers(cache)
        length = int(layers[0][0].shape[2])
        mask = torch.ones(1, length, dtype=torch.long)
        if not self.rows:
            self.rows, self._cache, self._mask = [owner], cache, mask
            return
        ours = cache_layers(self._cache)
        have = int(self._mask.shape[1])
        if length < have:
            layers = [(_pad(k, have - length), _pad(v, have - length)) for k, v in layers]
            mask = torch.cat([torch.zeros(1, have - length, dtype=torch.long), mask], dim=1)
        elif length > have:
            extra = length - have
            ours = [(_pad(k, extra), _pad(v, extra)) for k, v in ours]
            self._mask = torch.cat(
                [torch.zeros(len(self.rows), extra, dtype=torch.long), self._mask], dim=1)
        self._cache = new_cache((torch.cat([bk, k]), torch.cat([bv, v]))
                                for (bk, bv), (k, v) in zip(ours, layers, strict=True))
        self._mask = torch.cat([self._mask, mask])
        self.rows.append(owner)

    def remove(self, owners: Iterable[Any]) -> None:
        import torch

        gone = set(map(id, owners))
        keep = [i for i, owner in enumerate(self.rows) if id(owner) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep)
        self.rows = [self.rows[i] for i in keep]
        mask = self._mask.index_select(0, index)
        # Columns that are padding in every remaining row go too.
        start = int((mask.sum(dim=0) > 0).nonzero()[0])
        self._mask = mask[:, start:]
        self._cache = new_cache(
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
            for k, v in cache_layers(self._cache))

    def forward(self, model: Any, cache_arg: str, tokens: list[int]) -> Any:
        """One step: `tokens[i]` is fed to row i; returns the logits of each row's next
        token, (rows, vocab)."""
        import torch

        positions = self._mask.sum(dim=1, keepdim=True)  # each row's own count so far
        mask = torch.cat([self._mask, torch.ones(len(self.rows), 1, dtype=torch.long)], dim=1)
        out = model(input_ids=torch.tensor(tokens).unsqueeze(1), attention_mask=mask,
                    position_ids=positions, use_cache=True, logits_to_keep=1,
                    **{cache_arg: self._cache})
        self._cache = output_cache(out)
        self._mask = mask
        return out.logits[:, -1]


def _pad(tensor: Any, count: int) -> Any:
    """`count` zero positions in front of the sequence axis (2) of (batch, heads, len, dim)."""
    import torch

    shape = list(tensor.shape)
    shape[2] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=2)
