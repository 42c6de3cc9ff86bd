"""The one seam between mctp and the calling conventions of transformers' decoder layers.

transformers renames things between minor releases: up to 5.23 a decoder layer takes its
cache as ``past_key_values=`` and calls ``past_key_values.update(k, v, layer_idx)``; from
5.24 it takes ``cache=`` and calls ``cache.update(k, v, layer_idx, kwargs=...)``. Every
place in mctp that runs a decoder block (backbone layers, MCTP heads, our own
:class:`~mctp.layers.DecoderBlock`) goes through :func:`call_block`, which reads the name
from the block's signature once per class; :class:`~mctp.engine.cache.KVCache.update` accepts any
extra arguments. Nothing here imports transformers.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

__all__ = ["cache_argument", "call_block"]

_CACHE_NAMES = ("cache", "past_key_values")
_seen: dict[type, str | None] = {}


def cache_argument(block: nn.Module) -> str | None:
    """The keyword under which ``block.forward`` takes its KV cache.

    Returns:
        ``"cache"`` (transformers >= 5.24, our blocks), ``"past_key_values"`` (older
        transformers) or None when the block takes neither.
    """
    cls = type(block)
    if cls not in _seen:
        params = inspect.signature(block.forward).parameters
        _seen[cls] = next((n for n in _CACHE_NAMES if n in params), None)
    return _seen[cls]


def call_block(
    block: nn.Module,
    x: torch.Tensor,
    *,
    attention_mask: Any,
    position_ids: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache: Any = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Run one decoder block in the transformers 5 calling convention.

    Args:
        block: A transformers decoder layer or :class:`~mctp.layers.DecoderBlock`.
        x: ``[B, T, H]``.
        attention_mask: Mask in the form the block's attention expects.
        position_ids: ``[B, T]``.
        position_embeddings: ``(cos, sin)`` rotary tables for ``position_ids``.
        cache: A cache with ``update(k, v, layer_idx, ...)`` or None.
        **kwargs: Further keyword arguments for the block.

    Returns:
        ``[B, T, H]`` (the first element when a block returns a tuple).

    Raises:
        TypeError: If a cache is given but the block takes none.
    """
    if cache is not None:
        name = cache_argument(block)
        if name is None:
            raise TypeError(
                f"{type(block).__name__}.forward takes no KV cache argument "
                f"(looked for {_CACHE_NAMES})"
            )
        kwargs[name] = cache
        kwargs["use_cache"] = True
    out = block(
        x,
        attention_mask=attention_mask,
        position_ids=position_ids,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    return out[0] if isinstance(out, tuple) else out
