"""mctp.compat: the cache reaches a block under the name its release uses; KVCache.update
accepts the extra arguments of every release."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mctp.compat import cache_argument, call_block
from mctp.engine.cache import KVCache


class _Old(nn.Module):  # transformers <= 5.23 layer signature
    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=False,
        position_embeddings=None,
        **kw,
    ):
        k = v = hidden_states[:, None]  # [B, 1, T, H]
        past_key_values.update(k, v, 0, {"cache_position": None})
        return hidden_states + 1


class _New(nn.Module):  # transformers >= 5.24 layer signature
    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=False,
        position_embeddings=None,
        **kw,
    ):
        k = v = hidden_states[:, None]
        cache.update(k, v, 0, kwargs={"position_ids": position_ids})
        return (hidden_states + 2, None)


class _NoCache(nn.Module):
    def forward(
        self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None
    ):
        return hidden_states


@pytest.mark.parametrize(
    ("block", "name", "added"), [(_Old(), "past_key_values", 1), (_New(), "cache", 2)]
)
def test_the_cache_goes_under_the_name_the_block_takes(block, name, added):
    assert cache_argument(block) == name
    cache = KVCache(1, 1, 4)
    cache.set_positions(torch.arange(3))
    x = torch.randn(1, 3, 8)
    pos = torch.arange(3)[None]
    out = call_block(
        block, x, attention_mask=None, position_ids=pos, position_embeddings=(x, x), cache=cache
    )
    torch.testing.assert_close(out, x + added)  # tuple outputs are unpacked
    assert cache.allocated
    torch.testing.assert_close(cache.keys[0][:, :, :3], x[:, None])


def test_a_block_without_a_cache_argument_is_refused_by_name():
    block = _NoCache()
    assert cache_argument(block) is None
    x = torch.randn(1, 2, 4)
    assert (
        call_block(block, x, attention_mask=None, position_ids=None, position_embeddings=(x, x))
        is x
    )
    with pytest.raises(TypeError, match=r"_NoCache\.forward takes no KV cache"):
        call_block(
            block,
            x,
            attention_mask=None,
            position_ids=None,
            position_embeddings=(x, x),
            cache=KVCache(1, 1, 2),
        )


def test_allocate_up_front_with_different_key_and_value_sizes():
    cache = KVCache(2, 3, 10).allocate(
        [2, 1], [8, 8], value_head_dim=4, dtype=torch.float32, device="cpu"
    )
    assert cache.allocated
    assert cache.keys[0].shape == (3, 2, 10, 8) and cache.values[1].shape == (3, 1, 10, 4)
    with pytest.raises(ValueError, match="per-layer sizes"):
        KVCache(2, 1, 4).allocate([2], 8, dtype=torch.float32, device="cpu")
