"""The one backbone contract of ``mctp``: what MCTP training and generation need from an LLM.

A backbone is the speech LLM the MCTP heads sit on. It has two faces:

* training: :meth:`Backbone.forward` over a (packed) batch returns the last hidden states
  ``h^0`` the heads read (plus its own LM loss), and :meth:`Backbone.parts` hands the heads the
  modules they share (embedding, final norm, lm_head, rotary tables);
* generation: :meth:`Backbone.setup_caches` allocates every cache buffer up front and
  :meth:`Backbone.decode` runs the slots ``idx`` of a :class:`~mctp.engine.buffer.TokenBuffer`
  through the cache. Slots may be processed again (rolled back and re-read): the backbone
  overwrites or crops its cache entries at those slots. The cache object is opaque to the
  engine; only the backbone reads it.

:class:`mctp.backbones.HFBackbone` implements it; so can any test double. Nothing else in the
library defines a backbone contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from .engine.buffer import TokenBuffer

__all__ = ["Backbone", "BackboneParts", "ForwardOutput", "RotaryFn"]

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

    def decode(
        self,
        buffer: TokenBuffer,
        cache: Any,
        idx: torch.Tensor,
        *,
        all_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the buffer's slots ``idx [T]`` (a long tensor, ascending and contiguous) through
        the cache; slots below ``idx[0]`` must already be in it, slots at or after it may hold
        stale entries (they are overwritten).

        Returns:
            ``(hidden [B, T, H], logits [B, T, V] with all_logits else [B, 1, V])``.
        """
        ...
