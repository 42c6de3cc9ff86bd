"""``DecodeState``: the one object that owns what a generation remembers between steps."""

from __future__ import annotations

from typing import Any

import torch

from ..backbone import Backbone
from ..stack import MCTPStack
from .buffer import TokenBuffer
from .decoding import MCTPDecoder

__all__ = ["DecodeState"]


class DecodeState:
    """Positions, validity and ids (the token buffer), the backbone's caches and the MCTP heads'
    caches of one engine, allocated together up front and moved together.

    A call with fewer rows than ``max_batch`` may run only its own rows
    (:meth:`set_active_rows`: every buffer becomes a view of its leading rows) where the
    backbone's cache allows it (:attr:`narrowable`); fixed-shape (compiled) paths pad instead.

    The schedule loop reads and advances it; a rejected draft is undone with one call,
    :meth:`rollback`, which moves the buffer's cursor, the heads' progress and the count of
    slots whose backbone states are cached back together (the caches' stale entries past the
    cursor are overwritten when those slots are processed again).

    Args:
        backbone: The backbone (allocates its own cache, see
            :meth:`mctp.backbone.Backbone.setup_caches`).
        stack: The heads the engine runs (an audio-only view included), or None.
        max_batch: Rows ``B``.
        max_len: Slots ``S`` per row.
        device: Where every buffer lives.
        dtype: Cache dtype (None: the backbone's / the heads').

    Raises:
        ValueError: On non-positive sizes.
    """

    def __init__(
        self,
        backbone: Backbone,
        stack: MCTPStack | None,
        *,
        max_batch: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.buffer = TokenBuffer(max_batch, max_len, device)
        self.cache: Any = backbone.setup_caches(max_batch, max_len, dtype=dtype, device=device)
        self.heads: MCTPDecoder | None = (
            None
            if stack is None
            else MCTPDecoder(
                stack,
                self.buffer,
                dtype=dtype,
                prefill_chunk=getattr(backbone, "prefill_chunk", None),
            )
        )
        self.processed = 0
        """Slots whose backbone states are in the backbone's cache (and given to the heads)."""

    @property
    def narrowable(self) -> bool:
        """Whether the backbone's cache can run fewer rows than allocated (the engine's own
        :class:`~mctp.engine.cache.KVCache` can; a model's own growing cache cannot)."""
        return hasattr(self.cache, "set_active_rows")

    @property
    def active_rows(self) -> int:
        """Rows every step runs now."""
        return self.buffer.batch_size

    def set_active_rows(self, rows: int) -> None:
        """Run the leading ``rows`` rows only, in the buffer, the backbone's cache and the
        heads' caches at once; the other rows keep what they hold.

        Raises:
            ValueError: If ``rows`` is not in ``[1, max_batch]``, or differs from
                ``max_batch`` while the cache is not :attr:`narrowable`.
        """
        if rows != self.buffer.capacity and not self.narrowable:
            raise ValueError(
                f"this backbone's cache ({type(self.cache).__name__}) runs all "
                f"{self.buffer.capacity} rows; it cannot run {rows}"
            )
        self.buffer.set_active_rows(rows)
        if self.narrowable:
            self.cache.set_active_rows(rows)
        if self.heads is not None:
            self.heads.set_active_rows(rows)

    def start(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        *,
        heads_read_prompt_embeds: bool = False,
        lead: int = 0,
    ) -> None:
        """Load a prompt ``[B, P]`` and forget everything before it; steps run its ``B`` rows.

        Args:
            lead: Leading columns that are padding in every row (see :meth:`skippable`): the
                prefill starts after them (:attr:`processed`), and the heads too. Their slots
                keep whatever the caches held; the attention mask hides them.

        Raises:
            TypeError, ValueError: As :meth:`TokenBuffer.start` and :meth:`set_active_rows`;
                ValueError if ``lead`` is not in ``[0, P)`` or is nonzero where the cache is
                not indexed by slot.
        """
        if input_ids.ndim == 2 and 1 <= input_ids.shape[0] <= self.buffer.capacity:
            self.set_active_rows(input_ids.shape[0])
        if lead and not (self.narrowable and 0 < lead < input_ids.shape[-1]):
            raise ValueError(
                f"lead={lead} must be in [0, {input_ids.shape[-1]}) and needs a cache indexed "
                f"by slot ({type(self.cache).__name__} is not)"
            )
        self.buffer.start(
            input_ids,
            attention_mask,
            prompt_embeds,
            heads_read_prompt_embeds=heads_read_prompt_embeds,
        )
        if self.heads is not None:
            self.heads.start_at(lead)
        self.processed = lead

    def skippable(self, attention_mask: torch.Tensor | None) -> int:
        """Leading columns of a prompt's ``attention_mask [B, P]`` that are padding in every
        row, which :meth:`start` can skip: 0 where there are none or the backbone's cache is
        not indexed by slot (a growing cache holds what the prefill appended, padding too).
        One host read."""
        if attention_mask is None or not self.narrowable:
            return 0
        empty = (attention_mask == 0).all(dim=0).long()  # [P]
        return int(empty.cumprod(dim=0).sum())

    def backbone_done(self, start: int, hidden: torch.Tensor) -> None:
        """The backbone processed slots ``start .. start + T - 1`` (``hidden [B, T, H]``): hand
        the states to the heads and count them as cached."""
        if self.heads is not None:
            self.heads.write_backbone(start, hidden)
        self.processed = start + hidden.shape[1]

    def rollback(self, length: int) -> None:
        """Forget every slot from ``length`` on: the buffer's cursor, the heads' progress and
        the cached backbone slots move back together.

        Raises:
            ValueError: If ``length`` is not in ``[1, buffer.length]``.
        """
        self.buffer.truncate(length)
        if self.heads is not None:
            self.heads.truncate(length)
        self.processed = min(self.processed, length)

    def reset(self) -> None:
        """Forget the sequence (every buffer stays allocated)."""
        self.buffer.clear()
        if self.heads is not None:
            self.heads.reset()
        self.processed = 0
