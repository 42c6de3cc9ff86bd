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
    ) -> int:
        """Load a prompt ``[B, P]`` and forget everything before it; steps run its ``B`` rows.

        Leading columns that are padding in every row (``attention_mask``; e.g. a cohort's room
        for joining prompts) are skipped where the backbone's cache is indexed by slot: the
        prefill starts after them (:attr:`processed`), and the heads too. Their slots keep
        whatever the caches held; the attention mask hides them. (A growing cache holds what
        the prefill appended, padding too: nothing is skipped there.) One host read.

        Returns:
            The columns skipped.

        Raises:
            TypeError, ValueError: As :meth:`TokenBuffer.start` and :meth:`set_active_rows`.
        """
        if input_ids.ndim == 2 and 1 <= input_ids.shape[0] <= self.buffer.capacity:
            self.set_active_rows(input_ids.shape[0])
        self.buffer.start(
            input_ids,
            attention_mask,
            prompt_embeds,
            heads_read_prompt_embeds=heads_read_prompt_embeds,
        )
        lead = 0
        if attention_mask is not None and self.narrowable:
            empty = (attention_mask == 0).all(dim=0).long()  # [P]
            lead = min(int(empty.cumprod(dim=0).sum()), input_ids.shape[-1] - 1)
        if self.heads is not None:
            self.heads.start_at(lead)
        self.processed = lead
        return lead

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
