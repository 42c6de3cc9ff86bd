"""KVCache: up-front allocation, writes at the set slots, rollback by overwriting."""

from __future__ import annotations

import pytest
import torch

from mctp import KVCache


def test_allocate_then_update_writes_only_the_set_slots():
    cache = KVCache(2, 1, 6).allocate(2, 4, dtype=torch.float32, device="cpu")
    assert cache.allocated
    k = torch.ones(1, 2, 2, 4)
    cache.set_positions(torch.tensor([1, 2]))
    keys, values = cache.update(k, 2 * k, 1)
    assert keys.shape == (1, 2, 6, 4)
    assert keys[0, 0, :, 0].tolist() == [0, 1, 1, 0, 0, 0]
    assert values[0, 0, :, 0].tolist() == [0, 2, 2, 0, 0, 0]
    assert cache.keys[0].abs().sum() == 0  # the other layer is untouched
    # a rollback re-writes the same slots with new values
    cache.set_positions(torch.tensor([2]))
    keys, _ = cache.update(3 * torch.ones(1, 2, 1, 4), k[:, :, :1], 1)
    assert keys[0, 0, :, 0].tolist() == [0, 1, 3, 0, 0, 0]


def test_single_layer_cache_ignores_the_layer_index():
    cache = KVCache(1, 1, 4, single_layer=True)
    cache.set_positions(torch.tensor([0]))
    cache.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), 7)  # allocates on first use
    assert cache.allocated and cache.keys[0].shape == (1, 1, 4, 2)


def test_errors():
    with pytest.raises(ValueError, match="must be >= 1"):
        KVCache(0, 1, 4)
    with pytest.raises(RuntimeError, match="set_positions"):
        KVCache(1, 1, 4).update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), 0)
    with pytest.raises(ValueError, match="per-layer sizes"):
        KVCache(2, 1, 4).allocate([1, 1, 1], 2, dtype=torch.float32, device="cpu")
