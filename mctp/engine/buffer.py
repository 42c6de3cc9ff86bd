"""The token buffer shared by the backbone and the MCTP heads during generation.

Sequence indices are slots of fixed ``[B, S]`` buffers (ids, position ids, validity), so the
same kernels run every step (``torch.compile`` with static shapes, CUDA graphs). Lengths are
host integers derived from the schedule: the loop never waits on the device. One party moves
the cursor: the generation engine (:meth:`TokenBuffer.append`, :meth:`TokenBuffer.truncate`,
:meth:`TokenBuffer.advance` after the heads wrote their tokens in place).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from .cache import check_active_rows, static_buffer
from .masks import default_position_ids

__all__ = ["TokenBuffer"]


class TokenBuffer:
    """The sequence being decoded: ids, position ids and validity in ``[B, S]`` buffers.

    The buffers are allocated for ``batch_size`` rows (:attr:`capacity`); a call with fewer
    rows runs only the leading ones (:meth:`set_active_rows`, set by :meth:`start`): ``ids``,
    ``positions`` and ``valid`` are then views of those rows, and :attr:`batch_size` counts
    them. The :attr:`all_ids` keep every allocated row.

    Args:
        batch_size: ``B``, the rows allocated.
        max_len: ``S``, prompt plus everything that will be generated.
        device: Where the buffers live.

    Raises:
        ValueError: On non-positive sizes.
    """

    def __init__(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None
    ) -> None:
        if batch_size < 1 or max_len < 2:
            raise ValueError(f"batch_size ({batch_size}) must be >= 1 and max_len ({max_len}) >= 2")
        self.capacity, self.max_len = batch_size, max_len
        self.all_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self._all_positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self._all_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.index = torch.arange(max_len, device=device)
        for t in (self.all_ids, self._all_positions, self._all_valid, self.index):
            static_buffer(t)
        self.set_active_rows(batch_size)
        self.length = 0
        self.prompt_len = 0
        self.prompt_embeds: torch.Tensor | None = None
        self.heads_read_prompt_embeds = False

    def set_active_rows(self, rows: int) -> None:
        """Run the leading ``rows`` rows only (``ids``, ``positions`` and ``valid`` become
        views of them; at full capacity the allocated tensors themselves). What the other
        rows hold is kept.

        Raises:
            ValueError: If ``rows`` is not in ``[1, capacity]``.
        """
        check_active_rows(rows, self.capacity)
        self.batch_size = rows
        full = rows == self.capacity
        self.ids = self.all_ids if full else self.all_ids[:rows]
        self.positions = self._all_positions if full else self._all_positions[:rows]
        self.valid = self._all_valid if full else self._all_valid[:rows]

    def row_view(self, row: int) -> TokenBuffer:
        """A 1-row buffer over row ``row`` of this one (its tensors are views: what is written
        through it lands here; the cursor is copied, not shared). For a pass over one row
        alone (a request joining a batch).

        Raises:
            ValueError: If ``row`` is out of range, or the prompt came as embeddings.
        """
        if not 0 <= row < self.capacity:
            raise ValueError(f"row {row} out of range for {self.capacity} rows")
        if self.prompt_embeds is not None:
            raise ValueError("a buffer whose prompt came as embeddings has no 1-row view")
        view = copy.copy(self)
        view.capacity = 1
        view.all_ids = self.all_ids[row : row + 1]
        view._all_positions = self._all_positions[row : row + 1]
        view._all_valid = self._all_valid[row : row + 1]
        view.set_active_rows(1)
        return view

    @property
    def device(self) -> torch.device:
        """Device of the buffers."""
        return self.ids.device

    def embed(
        self,
        embedding: Callable[[torch.Tensor], torch.Tensor],
        idx: torch.Tensor,
        *,
        for_heads: bool = False,
    ) -> torch.Tensor:
        """Input embeddings ``[B, T, H]`` of slots ``idx [T]``: ``embedding(ids)``, with the
        prompt's own embeddings where :meth:`start` was given ``prompt_embeds``.

        With ``for_heads`` (the MCTP heads' inputs) the prompt embeddings are used only when
        :meth:`start` was given ``heads_read_prompt_embeds=True``: by default heads embed the
        token ids, placeholders included, as VITA-Audio-Plus does.
        """
        x = embedding(self.ids.index_select(1, idx))
        if self.prompt_embeds is None or (for_heads and not self.heads_read_prompt_embeds):
            return x
        p = self.prompt_len
        given = self.prompt_embeds.index_select(1, idx.clamp(max=p - 1)).to(x.dtype)
        return torch.where((idx < p)[None, :, None], given, x)

    def start(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        *,
        heads_read_prompt_embeds: bool = False,
    ) -> None:
        """Load the prompt ``[B, P]`` (left padding marked by ``attention_mask`` zeros); the
        buffer runs its leading ``B`` rows from now on (:meth:`set_active_rows`).

        Args:
            input_ids: ``[B, P]`` prompt ids.
            attention_mask: ``[B, P]`` (1 = real token), for left-padded batches.
            prompt_embeds: ``[B, P, H]`` embeddings to use for the prompt instead of the
                token embeddings (e.g. audio-encoder frames over placeholders), read by the
                backbone's prefill. The MCTP heads embed the prompt's token ids (VITA-Audio-Plus
                semantics) unless ``heads_read_prompt_embeds``.
            heads_read_prompt_embeds: Opt-in: the MCTP heads read ``prompt_embeds`` too (for
                heads trained that way, see ``inputs_embeds`` of :meth:`MCTPStack.forward`).

        Raises:
            TypeError: If ``input_ids`` are not integers (bool and float ids are refused).
            ValueError: On more rows than allocated, an empty prompt or one that fills the buffer,
                or ``heads_read_prompt_embeds`` without ``prompt_embeds``.
        """
        if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, P], got shape {tuple(input_ids.shape)}")
        b, p = input_ids.shape
        if not 1 <= b <= self.capacity:
            raise ValueError(f"buffer holds {self.capacity} rows, prompt has {b}")
        if p < 1:
            raise ValueError("the prompt must hold at least one token")
        if p >= self.max_len:
            raise ValueError(
                f"prompt length {p} leaves no room in a buffer of {self.max_len} slots"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        if prompt_embeds is not None and prompt_embeds.shape[:2] != (b, p):
            raise ValueError(
                f"prompt_embeds must be [B, P, H] with B, P = {(b, p)}, got {tuple(prompt_embeds.shape)}"
            )
        if heads_read_prompt_embeds and prompt_embeds is None:
            raise ValueError("heads_read_prompt_embeds=True needs prompt_embeds")
        self.set_active_rows(b)
        self.ids[:, :p] = input_ids
        self.positions[:, :p] = default_position_ids(input_ids, attention_mask)
        self.valid[:, :p] = True if attention_mask is None else attention_mask.bool()
        self.length = p
        self.prompt_embeds = prompt_embeds
        self.heads_read_prompt_embeds = heads_read_prompt_embeds
        self.prompt_len = p

    def append(self, ids: torch.Tensor) -> None:
        """Append ``ids [B, T]`` (positions continue from each row's last position).

        Raises:
            ValueError: If the buffer would overflow.
        """
        t = ids.shape[1]
        n = self.length
        if n + t > self.max_len:
            raise ValueError(f"sequence would reach {n + t} tokens, buffer holds {self.max_len}")
        self.ids[:, n : n + t] = ids
        step = torch.arange(1, t + 1, device=self.device)
        self.positions[:, n : n + t] = self.positions[:, n - 1 : n] + step
        self.valid[:, n : n + t] = True
        self.length = n + t

    def write_next(self, slot: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Write ``ids [B, 1]`` at ``positions [B, 1]`` into slot ``slot [1]`` (a tensor: the
        same kernel eagerly, compiled and in a CUDA graph) without moving the cursor; the
        writer calls :meth:`advance` once the tokens belong to the sequence."""
        self.ids.index_copy_(1, slot, ids)
        self.positions.index_copy_(1, slot, positions)
        self.valid.index_copy_(1, slot, torch.ones_like(self.valid[:, :1]))

    def advance(self, t: int) -> None:
        """Count ``t`` more slots (already written with :meth:`write_next`) as the sequence.

        Raises:
            ValueError: If ``t < 0`` or the buffer would overflow.
        """
        if t < 0 or self.length + t > self.max_len:
            raise ValueError(
                f"cannot advance by {t}: {self.length} of {self.max_len} slots are used"
            )
        self.length += t

    def clear(self) -> None:
        """Forget the sequence (the buffers stay allocated)."""
        self.length = 0
        self.prompt_len = 0
        self.prompt_embeds = None
        self.heads_read_prompt_embeds = False

    def truncate(self, length: int) -> None:
        """Forget everything from slot ``length`` on.

        Raises:
            ValueError: If ``length`` is not in ``[1, self.length]``.
        """
        if not 1 <= length <= self.length:
            raise ValueError(f"truncate length must be in [1, {self.length}], got {length}")
        self.length = length
