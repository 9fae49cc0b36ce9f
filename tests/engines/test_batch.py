"""The KV batch of the CPU engine: sequences of different lengths share one left-padded
cache."""

from __future__ import annotations


def test_the_batch_pads_on_the_left_and_drops_what_no_row_needs() -> None:
    import torch

    from sidecar.engines.batch import KVBatch, cache_layers, new_cache

    def cache(length: int, value: float) -> object:
        return new_cache([(torch.full((1, 2, length, 4), value),
                           torch.full((1, 2, length, 4), -value))] * 2)

    batch = KVBatch()
    batch.add("a", cache(3, 1.0))
    batch.add("b", cache(5, 2.0))  # longer: the batch is padded to it
    batch.add("c", cache(2, 3.0))  # shorter: padded to the batch
    keys = cache_layers(batch._cache)[0][0]
    assert keys.shape == (3, 2, 5, 4)
    assert batch._mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert keys[0, 0, :, 0].tolist() == [0, 0, 1, 1, 1]
    batch.remove(["b"])  # the first two columns are padding for every row left
    keys = cache_layers(batch._cache)[0][0]
    assert batch.rows == ["a", "c"] and keys.shape == (2, 2, 3, 4)
    assert batch._mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    batch.remove(["a", "c"])
    assert len(batch) == 0
