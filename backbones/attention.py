"""What the fast path must know about a transformers model's attention, read from its modules.

Sliding-window and hybrid local/global models name their windows differently: Qwen2 and the
Gemmas keep ``self_attn.sliding_window`` per layer (None on full layers), Mistral and Mixtral
read ``config.sliding_window`` inside every layer's forward, newer configs list
``config.layer_types``. :func:`layer_windows` reads all three, layer by layer, and
:func:`shrunk_windows` temporarily narrows every window so the construction-time self-check of
:class:`~mctp.backbones.HFBackbone` can look past the window with a short sequence.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = [
    "SUPPORTED_LAYER_TYPES",
    "layer_types",
    "layer_windows",
    "rotary_takes_layer_type",
    "shrunk_windows",
]

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_types(config: Any, num_layers: int) -> list[str]:
    """Each layer's attention type (``config.layer_types`` or all ``"full_attention"``)."""
    types = getattr(config, "layer_types", None)
    if not types:
        return ["full_attention"] * num_layers
    return [str(t) for t in types[:num_layers]]


def layer_windows(config: Any, layers: nn.ModuleList) -> list[int | None]:
    """Each layer's sliding window (keys at most ``window - 1`` slots back), or None (full).

    Reads, in order of precedence: the layer's own ``self_attn.sliding_window`` attribute,
    ``config.layer_types`` with ``config.sliding_window``, then ``config.sliding_window``
    alone (Mistral, Mixtral: every layer slides).
    """
    types = getattr(config, "layer_types", None)
    out: list[int | None] = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "sliding_window"):
            w = attn.sliding_window
        elif types:
            w = config.sliding_window if types[i] == "sliding_attention" else None
        else:
            w = getattr(config, "sliding_window", None)
        out.append(int(w) if w else None)
    return out


def rotary_takes_layer_type(rotary: nn.Module) -> bool:
    """Whether ``rotary(x, position_ids, layer_type)`` gives per-layer-type tables (Gemma3)."""
    return "layer_type" in inspect.signature(rotary.forward).parameters


@contextmanager
def shrunk_windows(config: Any, layers: nn.ModuleList, window: int) -> Iterator[None]:
    """Within the block, every sliding window of the model is ``window`` (restored after).

    Changes ``config.sliding_window`` (when set) and every ``self_attn.sliding_window``
    that is not None; the model's own forward and :func:`layer_windows` then both see the
    narrow window.
    """
    saved_cfg = getattr(config, "sliding_window", None)
    saved: list[tuple[nn.Module, int]] = []
    try:
        if saved_cfg:
            config.sliding_window = window
        for layer in layers:
            attn = getattr(layer, "self_attn", None)
            if attn is not None and getattr(attn, "sliding_window", None):
                saved.append((attn, attn.sliding_window))
                attn.sliding_window = window
        yield
    finally:
        if saved_cfg:
            config.sliding_window = saved_cfg
        for attn, w in saved:
            attn.sliding_window = w
