"""The one backbone contract of ``mctp``: what MCTP training and generation need from an LLM.

A backbone is the speech LLM the MCTP heads sit on. It has two faces:

* training: :meth:`Backbone.forward` over a (packed) batch returns the last hidden states
  ``h^0`` the heads read (plus its own LM loss), and :meth:`Backbone.parts` hands the heads the
  modules they share (embedding, final norm, lm_head, rotary tables);
* generation: :meth:`Backbone.setup_caches` allocates every cache buffer up front and
  :meth:`Backbone.decode` is one cached step over tensors (embeddings, positions, cache slots,
  validity) returning hidden states; :meth:`Backbone.logits` turns them into logits. Slots may
  be processed again (rolled back and re-read): the backbone overwrites or crops its cache
  entries at those slots. The cache object is opaque to the engine; only the backbone reads it.

:class:`mctp.backbones.HFBackbone` implements it; so can any test double. Nothing else in the
library defines a backbone contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Backbone", "BackboneParts", "ForwardOutput", "RotaryFn", "takes_key_start"]

RotaryFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class BackboneParts:
    """What MCTP heads borrow from a backbone.

    Attributes:
        embed: ``ids [B, T] -> [B, T, H]`` (the input embedding).
        norm: The final norm applied after the last decoder block.
        lm_head: ``nn.Linear``-like module with ``weight [V, H]`` (and optional bias).
        rotary: ``(x, position_ids [B, T]) -> (cos, sin)`` position tables, or None for a
            block that needs none.
        last_block: The backbone's last decoder block (copied to initialise head 0).
        hidden_size: ``H``.
        rms_eps: Epsilon of the backbone's RMSNorm (used for the heads' own norms).
    """

    embed: nn.Module
    norm: nn.Module
    lm_head: nn.Module
    rotary: RotaryFn | None
    last_block: nn.Module | None
    hidden_size: int
    rms_eps: float = 1e-6


class ForwardOutput(Protocol):
    """What :meth:`Backbone.forward` returns (e.g. ``mctp.backbones.BackboneOutput``).

    Attributes:
        hidden: ``[B, T, H]`` last hidden states after the final norm (MCTP's ``h^0``).
        logits: ``[B, T, V]`` when requested, else None.
        loss: Token-mean next-token cross-entropy when labels were given, else None.
    """

    hidden: torch.Tensor
    logits: torch.Tensor | None
    loss: torch.Tensor | None


@runtime_checkable
class Backbone(Protocol):
    """The backbone protocol (structural: implement the members, no base class needed)."""

    @property
    def hidden_size(self) -> int:
        """Model width ``H``."""
        ...

    @property
    def vocab_size(self) -> int:
        """Rows of the output projection ``V``."""
        ...

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> ForwardOutput:
        """Uncached training forward over ``input_ids [B, T]`` (packed samples restart their
        ``position_ids`` at 0; attention never crosses them)."""
        ...

    def parts(self) -> BackboneParts:
        """The modules MCTP heads share with this backbone."""
        ...

    def setup_caches(
        self,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Any:
        """Allocate every cache buffer for ``batch_size`` rows and ``max_len`` slots now.

        Returns:
            A cache object only :meth:`decode` reads.
        """
        ...

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[B, T, H]`` of ``ids [B, T]``."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output logits ``[B, T, V]`` of final hidden states ``[B, T, H]``."""
        ...

    def decode(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        valid: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """One cached decode step, a function of tensors: ``embeds [B, T, H]`` written at cache
        slots ``slots [T]`` (a long tensor, ascending and contiguous) with position ids
        ``positions [B, T]``; ``valid [B, S]`` marks the real slots. Slots below ``slots[0]``
        must already be in the cache, slots at or after it may hold stale entries (they are
        overwritten). The engine builds the tensors; the backbone never sees its buffer.

        A backbone whose class sets ``supports_key_start = True`` is also called with a keyword
        ``key_start``: ``valid`` then covers slots ``key_start .. key_start + S - 1`` and no
        slot before them is read (the eager engine skips slots no row reads any more); other
        backbones are never passed it.

        Returns:
            Final-normed hidden states ``[B, T, H]``.
        """
        ...


def takes_key_start(backbone: Any) -> bool:
    """Whether ``backbone.decode`` takes ``key_start`` (its class sets
    ``supports_key_start = True``, see :meth:`Backbone.decode`): it can skip the slots before
    the first one a row reads."""
    return bool(getattr(backbone, "supports_key_start", False))
