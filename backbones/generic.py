"""The generic path: any transformers causal LM through its own forward and its own cache.

For families not laid out like Llama (GPT-2, GPT-NeoX, Falcon, Phi, ...) or whose layers
need more than the fast loop does, :class:`~mctp.backbones.HFBackbone` runs the model's base
forward with a transformers ``DynamicCache``. Exact (it is the model's own code) but slower:
one host sync per call to find the slot range, and rollback crops the cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mctp.compat import cache_argument

__all__ = ["GenericRunner"]


class GenericRunner:
    """Hidden states of a transformers base model, uncached or with a cropped ``DynamicCache``.

    Args:
        model: The causal LM (its ``base_model`` is run).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base = model.base_model
        self.cache_name = cache_argument(self.base) or "past_key_values"

    def hidden(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any = None,
    ) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, H]``.

        Args:
            embeds: ``[B, T, H]`` input embeddings.
            position_ids: ``[B, T]``.
            attention_mask: ``[B, S]`` 2-D padding mask over cache + new tokens, or a prepared
                4-D mask ``[B, 1, T, S]`` (packed training).
            cache: A transformers ``Cache`` or None.
        """
        kwargs: dict[str, Any] = {self.cache_name: cache, "use_cache": cache is not None}
        out = self.base(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **kwargs,
        )
        return out.last_hidden_state

    def new_cache(self) -> Any:
        """An empty transformers ``DynamicCache`` that keeps every slot of every layer.

        Built without the model's config on purpose: sliding-window layers would then keep
        only their window and could not be cropped back (rollback); a full cache with the
        model's own window mask gives the same attention.
        """
        from transformers import DynamicCache

        return DynamicCache()

    def decode(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        key_valid: torch.Tensor,
        cache: Any,
        start: int,
    ) -> torch.Tensor:
        """Process slots ``start .. start + T - 1`` with the cache, cropping it first.

        Args:
            embeds: ``[B, T, H]`` embeddings of the slots.
            position_ids: ``[B, T]``.
            key_valid: ``[B, start + T]`` bool, real (non-padding) slots.
            cache: The cache holding at least slots ``0 .. start - 1``.
            start: First slot to process.

        Returns:
            ``[B, T, H]``.

        Raises:
            RuntimeError: If the cache holds fewer than ``start`` slots (a gap).
        """
        seen = int(cache.get_seq_length())
        if seen > start:
            # a negative argument removes that many tokens in every release (5.24 refuses a
            # positive target length, which older releases took)
            cache.crop(start - seen)
        elif seen < start:
            raise RuntimeError(f"cache holds {seen} slots but the forward starts at slot {start}")
        return self.hidden(embeds, position_ids, key_valid.long(), cache)
