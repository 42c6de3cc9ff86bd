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


@pytest.mark.parametrize("allocate", [True, False])
def test_active_rows_are_views_of_the_allocated_rows(allocate):
    cache = KVCache(2, 3, 8)
    if allocate:
        cache.allocate(2, 4, dtype=torch.float32, device="cpu")
    cache.set_active_rows(2)
    cache.set_positions(torch.tensor([1]))
    k, v = torch.ones(2, 2, 1, 4), torch.full((2, 2, 1, 4), 2.0)
    keys, _ = cache.update(k, v, 1)
    assert keys.shape == (2, 2, 8, 4)  # the active rows only
    assert cache._all_keys[1].shape == (3, 2, 8, 4)  # allocated once for every row
    assert cache._all_keys[1][:2, :, 1].eq(1).all() and cache._all_keys[1][2].eq(0).all()
    cache.set_active_rows(3)  # back to every row: the buffers themselves, written data kept
    assert cache.keys[1] is cache._all_keys[1] and cache.keys[1][:2, :, 1].eq(1).all()
    if allocate:  # row views need every layer allocated
        assert cache.rows(2, 3).keys[1].shape[0] == 1
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        cache.set_active_rows(4)
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        cache.set_active_rows(0)


def test_token_buffer_runs_the_rows_a_prompt_has():
    from mctp.engine.buffer import TokenBuffer

    buf = TokenBuffer(3, 8)
    buf.start(torch.tensor([[5, 6, 7]]))
    assert buf.batch_size == 1 and buf.capacity == 3 and buf.ids.shape == (1, 8)
    buf.append(torch.tensor([[9]]))
    assert buf.all_ids[0, :4].tolist() == [5, 6, 7, 9] and buf.all_ids[1:].eq(0).all()
    buf.set_active_rows(2)
    assert buf.ids.shape == (2, 8) and buf.ids[0, 3] == 9
    with pytest.raises(ValueError, match="holds 3 rows, prompt has 4"):
        buf.start(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        buf.set_active_rows(4)


def test_layer_views_cover_the_visible_slots_and_count_slots_from_start():
    """What a compiled region gets: the whole buffers with fixed shapes, else views of the
    slots ``start .. visible - 1`` and the slots to write counted from ``start``; writing
    through the views lands in the cache."""
    cache = KVCache(2, 1, 16).allocate(2, 4, dtype=torch.float32, device="cpu")
    cache.set_positions(torch.tensor([5, 6]))
    keys, values, slots = cache.layer(1)
    assert keys.shape == (1, 2, 16, 4) and slots.tolist() == [5, 6]
    cache.set_positions(torch.tensor([5, 6]), visible=7, start=3)
    keys, values, slots = cache.layer(1)
    assert keys.shape == (1, 2, 4, 4) and values.shape == (1, 2, 4, 4)
    assert slots.tolist() == [2, 3]
    view = KVCache.over(keys, values, slots)
    new = torch.ones(1, 2, 2, 4)
    view.update(new, 2 * new, 0)
    assert torch.equal(cache.keys[1][:, :, 5:7], new)
    assert torch.equal(cache.values[1][:, :, 5:7], 2 * new)
    assert cache.keys[1][:, :, :5].abs().sum() == 0 and cache.keys[0].abs().sum() == 0
