"""Restricting a shared lm_head to a subset of rows (e.g. audio tokens + BOA/EOA)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OutputVocab"]


class OutputVocab:
    """A subset of a vocabulary that MCTP heads score.

    Logits over the subset equal the full-vocabulary logits restricted to those rows, so
    greedy and sampled choices are unchanged whenever the full-vocabulary choice lies in
    the subset (in VITA-Audio's Boost/Balance modes MCTP heads only emit audio tokens and
    the BOA/EOA tags).

    Args:
        ids: A ``slice`` (``start``/``stop``, step 1) or any collection of distinct ids.
            A collection that forms one contiguous range is stored as a slice, which makes
            the weight restriction a free view.
        vocab_size: Size of the full vocabulary, for validation.

    Raises:
        ValueError: If the subset is empty, has duplicates or leaves ``[0, vocab_size)``.
    """

    def __init__(self, ids: slice | Sequence[int] | torch.Tensor, vocab_size: int) -> None:
        if isinstance(ids, slice):
            start, stop, step = ids.indices(vocab_size)
            if step != 1 or ids.start is None or ids.stop is None:
                raise ValueError(
                    f"output_vocab slice needs explicit start/stop and step 1, got {ids}"
                )
            index = torch.arange(start, stop)
        else:
            index = torch.as_tensor(
                list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long
            ).flatten()
        if index.numel() == 0:
            raise ValueError("output_vocab is empty")
        if int(index.min()) < 0 or int(index.max()) >= vocab_size:
            raise ValueError(
                f"output_vocab ids must lie in [0, {vocab_size}), got range [{int(index.min())}, {int(index.max())}]"
            )
        if index.unique().numel() != index.numel():
            raise ValueError("output_vocab has duplicate ids")
        self.index = index
        self.vocab_size = vocab_size
        first = int(index[0])
        contiguous = bool((index == torch.arange(first, first + index.numel())).all())
        self.slice = slice(first, first + index.numel()) if contiguous else None
        # global id -> local id (or -1), for mapping targets
        lookup = torch.full((vocab_size,), -1, dtype=torch.long)
        lookup[index] = torch.arange(index.numel())
        self._lookup = lookup

    def __len__(self) -> int:
        return self.index.numel()

    def logits(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """``hidden [..., H]`` -> ``[..., len(self)]`` using the subset of ``lm_head``'s rows."""
        weight = lm_head.weight
        bias = getattr(lm_head, "bias", None)
        if self.slice is not None:
            w = weight[self.slice]
            b = bias[self.slice] if bias is not None else None
        else:
            idx = self.index.to(weight.device)
            w = weight.index_select(0, idx)
            b = bias.index_select(0, idx) if bias is not None else None
        return F.linear(hidden, w, b)

    def to_global(self, local_ids: torch.Tensor) -> torch.Tensor:
        """Map subset-local ids to vocabulary ids (same shape)."""
        if self.slice is not None:
            return local_ids + self.slice.start
        return self.index.to(local_ids.device)[local_ids]

    def to_local(self, global_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Map vocabulary ids to subset-local ids; ids outside the subset give -1.

        ``ignore_index`` entries are kept as they are.
        """
        lookup = self._lookup.to(global_ids.device)
        ignored = global_ids == ignore_index
        local = lookup[global_ids.clamp(0, self.vocab_size - 1)]
        local = torch.where((global_ids < 0) | (global_ids >= self.vocab_size), -1, local)
        return torch.where(ignored, ignore_index, local)
